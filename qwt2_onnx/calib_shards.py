"""Calibration of the activation ranges over shards of the samples (a ``--ray`` compile's first phase), with
the same ranges, bit for bit, as ``calibrate.collect_ranges`` in one process.

One process feeds each observer its chunks (a sample's rows of a batch, ``runtime.per_sample``) in sample
order.  A histogram observer starts its range ±A at the first chunk's max |x| and doubles A (merging bins
pairwise, exactly) whenever a chunk exceeds it; so each chunk's histogram is taken at the A of its moment.
Sharded, in two passes over the data:

1. every shard worker returns each of its chunks' (min, max) per tensor; the driver replays the observers'
   min / max and the doublings of A in sample order, so it knows each chunk's A and the final A;
2. every worker histograms each chunk at that chunk's A, merges it up to the final A, and returns one sum
   per tensor — integer counts, whose sum does not depend on the order.

A ``minmax`` calibration needs only pass 1.  Batches are cut where one process cuts them (shards start at
batch boundaries, the batch size chosen once on the driver); a model that cannot run a batch (one process
falls back to one sample at a time from there on) is calibrated on the driver instead, as without shards.
What moves: two floats per chunk and tensor, then one histogram (4096 counts) per tensor and worker.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from .calib_data import CalibrationSet
from .config import CalibConfig
from .cwac.fit import gather_in_turn
from .cwac.shards import shard_bounds
from .observers import BINS, ActivationRange, HistogramObserver, double_histogram, make_observer
from .runtime import batch_size_within, batches, make_session, per_sample, with_outputs


class BatchFailed(Exception):
    """A batch of more than one sample did not run: one process would fall back to one sample at a time."""


class CalibShard:
    """One shard's calibration work: batches ``[lo, hi)`` (of ``size`` samples) of ``data``."""

    def __init__(self, model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, size: int, lo: int, hi: int):
        self.session = make_session(with_outputs(model, tensors), optimized=True)
        self.tensors, self.size = tensors, size
        self.data = data.take(lo * size, hi * size)

    def _chunks(self) -> Iterator[list[np.ndarray]]:
        """Per chunk, in order: the chunk of each tensor (a list aligned with ``tensors``)."""
        for feed, n in batches(self.data, self.size):
            try:
                values = self.session.run(self.tensors, feed)
            except Exception as e:
                if n == 1:
                    raise
                raise BatchFailed(str(e)[:200]) from None
            split = [per_sample(v, n) for v in values]
            for i in range(max(len(s) for s in split)):
                yield [s[i] if i < len(s) else None for s in split]

    def extremes(self) -> list[list[tuple[float, float] | None]] | None:
        """Pass 1: per chunk, per tensor, (min, max) — None for an empty chunk or none at this position; None
        for the whole shard where a batch did not run."""
        try:
            return [[(float(x.min()), float(x.max())) if x is not None and x.size else None for x in chunk]
                    for chunk in self._chunks()]
        except BatchFailed:
            return None

    def histograms(self, amax: list[list[float | None]], final: list[float]) -> list[np.ndarray]:
        """Pass 2: per tensor, the sum of this shard's chunk histograms, each taken at its chunk's A (``amax``,
        per chunk per tensor) and merged up to the final A."""
        total = [np.zeros(BINS, np.int64) for _ in self.tensors]
        for chunk, a_chunk in zip(self._chunks(), amax):
            for j, (x, a) in enumerate(zip(chunk, a_chunk)):
                if a is None:
                    continue
                h = np.histogram(x, bins=BINS, range=(-a, a))[0]
                while a < final[j]:
                    h, a = double_histogram(h), a * 2
                total[j] += h
        return total


def _replay(chunks: list[list[tuple[float, float] | None]], n_tensors: int):
    """The observers' min / max and A, chunk by chunk as one process sees them: (lo, hi, final A, A per chunk)."""
    lo, hi, amax = [np.inf] * n_tensors, [-np.inf] * n_tensors, [0.0] * n_tensors
    per_chunk = []
    for chunk in chunks:
        row = []
        for j, e in enumerate(chunk):
            if e is None:
                row.append(None)
                continue
            lo[j], hi[j] = min(lo[j], e[0]), max(hi[j], e[1])
            need = max(abs(lo[j]), abs(hi[j]))
            if amax[j] == 0.0:
                amax[j] = need if need > 0 else 1e-12
            while need > amax[j]:
                amax[j] *= 2
            row.append(amax[j])
        per_chunk.append(row)
    return lo, hi, amax, per_chunk


def collect_ranges_sharded(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, cfg: CalibConfig,
                           pool, workers: int) -> dict[str, ActivationRange] | None:
    """``calibrate.collect_ranges`` over ``workers`` shards run by ``pool`` (``start(model, tensors, data, size,
    bounds)`` -> workers, ``gather(workers, method, *args)``, ``stop(workers)``); None where a batch did not
    run (the caller calibrates in one process then)."""
    samples = data if cfg.max_samples is None else data.take(0, cfg.max_samples)
    n = samples.length if samples.length is not None else sum(1 for _ in samples)
    probe = make_session(with_outputs(model, tensors), optimized=True)
    size = batch_size_within(samples, cfg.batch_size, lambda f: probe.run(tensors, f))
    bounds = shard_bounds(-(-n // size), workers)
    shards = pool.start(model, tensors, samples, size, bounds)
    try:
        extremes = pool.gather(shards, "extremes")
        if any(e is None for e in extremes):
            return None
        per_shard = [len(e) for e in extremes]
        lo, hi, final, amax = _replay([c for e in extremes for c in e], len(tensors))
        hists = None
        if cfg.method != "minmax":
            starts = np.cumsum([0, *per_shard])
            hists = pool.gather_each(shards, "histograms", [(amax[starts[i]:starts[i + 1]], final)
                                                            for i in range(len(shards))])
    finally:
        pool.stop(shards)
    out = {}
    for j, t in enumerate(tensors):
        obs = make_observer(cfg.method, cfg.percentile)
        obs.lo, obs.hi = lo[j], hi[j]
        if isinstance(obs, HistogramObserver):
            obs.amax = final[j]
            obs.hist = sum((h[j] for h in hists), np.zeros(BINS, np.int64))
        out[t] = ActivationRange(t, *obs.range(), cfg.method)
    return out


class LocalCalibShards:
    """The calibration shards in this process, one after another (tests: the protocol without a cluster)."""

    def start(self, model, tensors, data, size, bounds) -> list[CalibShard]:
        return [CalibShard(model, tensors, data, size, lo, hi) for lo, hi in bounds]

    gather = staticmethod(gather_in_turn)

    @staticmethod
    def gather_each(shards: list, method: str, args: list[tuple]) -> list:
        return [getattr(s, method)(*a) for s, a in zip(shards, args)]

    def stop(self, shards: list) -> None:
        pass
