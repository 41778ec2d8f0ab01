"""Streaming observers: state independent of sample count, exact histogram merging."""
from __future__ import annotations

import numpy as np

from qwt2_onnx.observers import BINS, HistogramObserver, MinMaxObserver


def test_histogram_doubling_is_exact():
    rng = np.random.default_rng(0)
    batches = [rng.normal(scale=s, size=1000) for s in (0.1, 1.0, 7.0)]  # range grows twice
    obs = HistogramObserver("percentile")
    for b in batches:
        obs.update(b)
    allx = np.concatenate(batches)
    ref, _ = np.histogram(allx, bins=BINS, range=(-obs.amax, obs.amax))
    # merged bins equal a histogram of all data up to values sitting exactly on an old bin edge
    assert obs.hist.sum() == allx.size
    assert np.abs(obs.hist - ref).sum() <= 4
    assert obs.hist.nbytes == BINS * 8  # O(bins), whatever the sample count


def test_percentile_matches_numpy():
    x = np.random.default_rng(1).standard_normal(200_000)
    obs = HistogramObserver("percentile", percentile=99.0)
    for chunk in np.array_split(x, 20):
        obs.update(chunk)
    lo, hi = obs.range()
    assert abs(hi - np.percentile(x, 99.0)) < 0.02 and abs(lo - np.percentile(x, 1.0)) < 0.02


def test_entropy_clips_outliers_but_keeps_the_bulk():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(100_000), [60.0, -55.0]])
    obs = HistogramObserver("entropy")
    obs.update(x)
    lo, hi = obs.range()
    assert 2.5 < hi < 30 and -30 < lo < -2.5


def test_minmax():
    obs = MinMaxObserver()
    obs.update(np.array([1.0, -2.0]))
    obs.update(np.array([3.0]))
    assert obs.range() == (-2.0, 3.0)


def _tokens(rng, outlier_channels: int, spread_tail: bool = False) -> np.ndarray:
    """[positions, 384] activations: normal, with ``outlier_channels`` channels 20x larger (a LayerNorm
    output's systematic outliers), or a heavy tail on every channel (``spread_tail``)."""
    x = rng.standard_normal((4096, 384)).astype(np.float32)
    x[:, :outlier_channels] *= 20
    if spread_tail:
        x = np.sign(x) * np.abs(x) ** 1.6
    return x


def test_auto_keeps_the_range_of_a_few_outlier_channels_and_clips_a_spread_tail():
    rng = np.random.default_rng(0)
    for x, keeps in ((_tokens(rng, 1), True), (_tokens(rng, 2), True), (_tokens(rng, 0, spread_tail=True), False),
                     (_tokens(rng, 40), False)):
        auto, pct = HistogramObserver("auto"), HistogramObserver("percentile")
        for chunk in np.array_split(x, 8):  # batches: per-channel maxima merge exactly
            auto.update(chunk[None])
            pct.update(chunk[None])
        clipped = pct.range()
        assert clipped[1] < float(x.max())  # percentile clips every case
        assert auto.range() == ((float(x.min()), float(x.max())) if keeps else clipped)


def test_auto_is_percentile_where_a_tensor_is_not_per_token():
    rng = np.random.default_rng(1)
    pooled = rng.standard_normal((64, 384)).astype(np.float32)  # one position per sample: a classifier's features
    pooled[:, 0] *= 20
    auto, pct = HistogramObserver("auto"), HistogramObserver("percentile")
    for row in pooled:
        auto.update(row[None])
        pct.update(row[None])
    assert auto.range() == pct.range()
    feature_map = rng.standard_normal((1, 16, 64, 64)).astype(np.float32)  # NCHW: never per-token
    feature_map[..., 0] *= 20  # one column of large values: would read as one outlier "channel"
    auto, pct = HistogramObserver("auto"), HistogramObserver("percentile")
    auto.update(feature_map)
    pct.update(feature_map)
    assert auto.range() == pct.range() and pct.range()[1] < float(feature_map.max())


def test_calib_method_auto_end_to_end_keeps_an_outlier_channel_in_range(tmp_path):
    """``--calib-method auto`` on a per-token model whose input has one channel 20x the others: that
    input's quantizer gets minmax's scale, not percentile's (99 here, which clips it)."""
    import onnx
    from onnx import numpy_helper

    from qwt2_onnx import CompileConfig, compile_model
    from qwt2_onnx.config import CalibConfig, CwacConfig
    from tiny_models import masked_token_net

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64, 4)).astype(np.float32)
    x[..., 0] *= 20
    np.savez(tmp_path / "c.npz", x=x, mask=np.ones((16, 64), np.int64))
    onnx.save(masked_token_net(tokens=64), tmp_path / "m.onnx")
    scales: dict[str, dict[str, float]] = {}
    for method in ("minmax", "percentile", "auto"):
        out = tmp_path / f"{method}.onnx"
        compile_model(tmp_path / "m.onnx", tmp_path / "c.npz", out,
                      CompileConfig(calib=CalibConfig(method=method, percentile=99.0), cwac=CwacConfig(enabled=False),
                                    check=False,
                                    holdout_samples=0))
        m = onnx.load(out)
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        scales[method] = {n.input[0]: float(inits[n.input[1]]) for n in m.graph.node
                          if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    assert scales["percentile"]["x"] < scales["minmax"]["x"]
    assert scales["auto"]["x"] == scales["minmax"]["x"]
    assert set(scales["auto"]) == set(scales["percentile"]) and len(scales["auto"]) > 1
    # per tensor, auto takes percentile's range or minmax's, nothing in between
    assert all(scales["auto"][t] in (scales["percentile"][t], scales["minmax"][t]) for t in scales["auto"])
