"""The staged fit over shards of the calibration set (issue 25): any split gives the same bytes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from qwt2_onnx import CompileConfig, QuantConfig, compile_model
from qwt2_onnx.calib_data import CalibrationSet, InputSpec
from qwt2_onnx.config import CwacConfig
from qwt2_onnx.cwac.fit import fit_compensations
from qwt2_onnx.cwac.shards import LocalShards, shard_bounds
from tiny_models import conv_net, masked_token_net, sigmoid_head_net


def test_shard_bounds_cover_every_sample_once():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 3) == [(0, 1), (1, 2)]
    for n in range(1, 30):
        for w in range(1, 6):
            b = shard_bounds(n, w)
            assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))


def _plain(tmp_path, model, feeds):
    onnx.save(model, tmp_path / "m.onnx")
    cfg = CompileConfig(quant=QuantConfig(wbits=4), cwac=CwacConfig(enabled=False), holdout_samples=0)
    res = compile_model(tmp_path / "m.onnx", feeds, tmp_path / "q.onnx", cfg, measure=False)
    return res, CalibrationSet(lambda: iter(feeds), InputSpec.from_model(res.float_model), "test", len(feeds))


def _tokens(n):
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        mask = np.zeros((1, 6), np.int64)
        mask[0, :2 + i % 4] = 1
        out.append({"x": rng.normal(size=(1, 6, 4)).astype(np.float32), "mask": mask})
    return out


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("case", ["conv_auto", "score_head", "position_mask"])
def test_the_fit_over_shards_equals_the_fit_in_one_process(tmp_path, case):
    """2 and 3 shard workers (in this process): the same kept layers, gains and biases bit for bit, the
    same gate record and per-layer held-out errors, as one worker over every sample."""
    model, feeds, cfg = {
        "conv_auto": (conv_net(), _images(22), CwacConfig()),
        "score_head": (sigmoid_head_net(), _images(17, seed=1), CwacConfig()),
        "position_mask": (masked_token_net(), _tokens(19), CwacConfig(position_mask="mask")),
    }[case]
    res, data = _plain(tmp_path, model, feeds)
    one = fit_compensations(res.float_model, res.plain_model, res.plan, data, cfg)
    assert one.layers, case
    if case == "score_head":  # the heads' two-round protocol (held-out score errors) is exercised
        assert any(f.fit == "keep spread" for f in one.layers)
    if case == "position_mask":
        assert all(f.real_positions_only for f in one.layers)
    for workers in (2, 3):
        many = fit_compensations(res.float_model, res.plain_model, res.plan, data, cfg,
                                 shards=LocalShards(workers))
        assert many.target == one.target and many.output_error == one.output_error
        assert set(many.compensations) == set(one.compensations)
        for name, c in one.compensations.items():
            assert many.compensations[name].gain.tobytes() == c.gain.tobytes()
            assert many.compensations[name].bias.tobytes() == c.bias.tobytes()
        assert [(f.layer, f.kept, f.mse_before, f.mse_after, f.fit, f.real_positions_only) for f in many.layers] == \
            [(f.layer, f.kept, f.mse_before, f.mse_after, f.fit, f.real_positions_only) for f in one.layers]


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_ranges_calibrated_over_shards_equal_one_process(method, batch_size):
    """Two passes over 2 and 3 shards (extremes, then histograms at each chunk's own range) give the ranges
    of one process bit for bit, whatever the batch size; samples grow in scale so the histogram's range
    doubles along the way, and a zero first sample starts it at 1e-12."""
    from qwt2_onnx.calib_shards import LocalCalibShards, collect_ranges_sharded
    from qwt2_onnx.calibrate import collect_ranges
    from qwt2_onnx.config import CalibConfig

    model = conv_net()
    rng = np.random.default_rng(5)
    feeds = [{"x": np.zeros((1, 3, 8, 8), np.float32)}] + \
        [{"x": (rng.normal(size=(1, 3, 8, 8)) * 1.7 ** i).astype(np.float32)} for i in range(10)]
    data = CalibrationSet(lambda: iter(feeds), InputSpec.from_model(model), "test", len(feeds))
    tensors = [o for n in model.graph.node for o in n.output]
    cfg = CalibConfig(method, 99.9, batch_size)
    one = collect_ranges(model, tensors, data, cfg)
    for workers in (2, 3):
        many = collect_ranges_sharded(model, tensors, data, cfg, LocalCalibShards(), workers)
        assert many == one, (method, batch_size, workers)
