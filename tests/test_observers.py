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
