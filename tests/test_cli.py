"""The command line: exit codes, clear errors without tracebacks, the embedded default."""
from __future__ import annotations

import onnx
from click.testing import CliRunner

from qwt2_onnx.cli import main
from tiny_models import calib_npz, conv_net


def invoke(*args, cwd=None):
    runner = CliRunner()
    return runner.invoke(main, list(map(str, args)), catch_exceptions=False)


def test_embedded_default_prints_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("compile")
    assert res.exit_code == 0, res.output
    assert "digits test accuracy: float 0.99" in res.output
    line = next(line for line in res.output.splitlines() if line.startswith("digits test accuracy"))
    f, sim, dep, plain = (float(part.split()[-1]) for part in line.split("|"))
    assert sim >= f - 0.01 and dep >= f - 0.01 and dep >= plain
    assert "CWAC: target" in res.output and "fused vs unfused (same activation codes)" in res.output
    assert (tmp_path / "digits_cnn.int8.ort.onnx").exists()


def test_default_output_path_beside_input(tmp_path):
    onnx.save(conv_net(), tmp_path / "net.onnx")
    res = invoke("compile", tmp_path / "net.onnx", "--calib", calib_npz(tmp_path / "c.npz"), "--target", "trt")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "net.int8.trt.onnx").exists()
    assert "onnxruntime:" in res.output and "deployed SQNR" in res.output


def test_user_errors_exit_2_without_traceback(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
    cases = [
        (["compile", tmp_path / "missing.onnx", "--calib", tmp_path / "c.npz"], "model file not found"),
        (["compile", tmp_path / "junk.onnx", "--calib", tmp_path / "c.npz"], "cannot read"),
        (["compile", tmp_path / "net.onnx"], "no calibration data"),
        (["compile", tmp_path / "net.onnx", "--calib", tmp_path / "nope.npz"], "calibration data not found"),
    ]
    onnx.save(conv_net(), tmp_path / "net.onnx")
    for args, message in cases:
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and "Traceback" not in res.output


def test_random_calib_warns_loudly(tmp_path):
    onnx.save(conv_net(), tmp_path / "net.onnx")
    res = invoke("compile", tmp_path / "net.onnx", "--random-calib", "8", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 0, res.output
    assert "RANDOM samples" in res.output
