"""Calibration data sources and the checks that run before any heavy work."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from qwt2_onnx import QwtError, compile_model
from qwt2_onnx.calib_data import ImagePreprocess, InputSpec, open_calibration
from tiny_models import conv_net

SPECS = InputSpec.from_model(conv_net())


def _first(source, pre=None):
    return next(iter(open_calibration(source, SPECS, pre)))


def test_npz_streams_one_sample_at_a_time(tmp_path):
    x = np.arange(5 * 3 * 8 * 8, dtype=np.float32).reshape(5, 3, 8, 8)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    cs = open_calibration(tmp_path / "c.npz", SPECS)
    got = [s["x"] for s in cs]
    assert cs.length == 5 and len(got) == 5 and got[0].shape == (1, 3, 8, 8)
    assert np.array_equal(np.concatenate(got), x)
    assert [s["x"][0, 0, 0, 0] for s in cs.take(3, 5)] == [x[3, 0, 0, 0], x[4, 0, 0, 0]]


def test_folder_of_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.normal(size=(3, 8, 8)).astype(np.float32))  # one sample without batch axis
    np.save(tmp_path / "b.npy", rng.normal(size=(2, 3, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(4, 3, 8, 8)).astype(np.float32))
    assert len(list(open_calibration(tmp_path, SPECS))) == 1 + 2 + 4


def test_image_folder_with_preprocessing(tmp_path):
    from PIL import Image

    img = np.zeros((20, 30, 3), np.uint8)
    img[..., 0] = 255
    Image.fromarray(img).save(tmp_path / "red.png")
    pre = ImagePreprocess(size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = _first(tmp_path, pre)["x"]
    assert x.shape == (1, 3, 8, 8)
    assert np.allclose(x[0, 0], 1.0) and np.allclose(x[0, 1:], -1.0)
    bgr = _first(tmp_path, ImagePreprocess(size=(8, 8), channel_order="BGR"))["x"]
    assert np.allclose(bgr[0, 2], 1.0) and np.allclose(bgr[0, 0], 0.0)


def test_image_folder_without_preprocessing_is_explained(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(QwtError, match="no preprocessing") as e:
        _first(tmp_path)
    assert "--image-size" in str(e.value)


def test_python_iterables_and_readers():
    samples = [{"x": np.zeros((1, 3, 8, 8), np.float32)} for _ in range(3)]
    assert len(list(open_calibration(iter(samples), SPECS))) == 3
    cs = open_calibration(lambda: iter(samples), SPECS)
    assert len(list(cs)) == 3 and len(list(cs)) == 3, "a reader can be streamed more than once"


@pytest.mark.parametrize("arrays, message, note", [
    ({"image": np.zeros((2, 3, 8, 8), np.float32)}, "does not match the model inputs", "missing: ['x']"),
    ({"x": np.zeros((2, 3, 8, 8), np.float64)}, "dtype float64", "astype(np.float32)"),
    ({"x": np.zeros((2, 8, 8), np.float32)}, "rank 3", "shape [1, 8, 8]"),
    ({"x": np.zeros((2, 3, 9, 8), np.float32)}, "expects [N, 3, 8, 8]", "axis 2: expected 8, got 9"),
])
def test_bad_data_is_named(tmp_path, arrays, message, note):
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(QwtError) as e:
        _first(tmp_path / "c.npz")
    assert message in str(e.value) and note in str(e.value)


def test_nan_names_input_and_sample(tmp_path):
    x = np.zeros((4, 3, 8, 8), np.float32)
    x[2, 0, 1, 1] = np.nan
    np.savez(tmp_path / "c.npz", x=x)
    with pytest.raises(QwtError, match=r"'x' sample 2 holds 1 NaN/Inf"):
        list(open_calibration(tmp_path / "c.npz", SPECS))


def test_empty_set_and_missing_file(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(QwtError, match="holds no samples"):
        _first(tmp_path / "c.npz")
    with pytest.raises(QwtError, match="not found"):
        open_calibration(tmp_path / "nope.npz", SPECS)


def test_bad_data_fails_before_heavy_work(tmp_path):
    onnx.save(conv_net(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 8, 8), np.float64))
    with pytest.raises(QwtError) as e:
        compile_model(tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx")
    assert "stage 'load'" in str(e.value)
    assert not (tmp_path / "o.onnx").exists()
