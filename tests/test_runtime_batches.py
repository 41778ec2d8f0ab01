"""Batch sizing: the first two samples, run as one batch, decide whether the model takes batches and how
many samples a batch may hold."""
from __future__ import annotations

import numpy as np

from qwt2_onnx.runtime import batch_size_within, batches


def _samples(n, shape=(1, 4)):
    return [{"x": np.full(shape, i, np.float32)} for i in range(n)]


def test_batch_size_keeps_one_batch_of_outputs_within_the_limit():
    run = lambda feed: [np.zeros((len(feed["x"]), 250), np.float32)] * 2  # noqa: E731 - 2000 bytes a sample
    samples = _samples(10)
    assert batch_size_within(samples, 8, run, limit=3 * 2000) == 3
    assert batch_size_within(samples, 8, run, limit=10**9) == 8  # never above the requested size
    assert batch_size_within(samples, 8, run, limit=1) == 1  # never below one
    assert [n for _, n in batches(samples, batch_size_within(samples, 8, run, limit=6000))] == [3, 3, 3, 1]


def test_no_probe_run_when_one_sample_is_asked_for_or_there_is_no_sample():
    def run(feed):
        raise AssertionError("should not run")
    assert batch_size_within(_samples(3), 1, run) == 1
    assert batch_size_within([], 8, run) == 8


def test_a_model_that_rejects_a_batch_runs_one_sample_at_a_time():
    def run(feed):  # what onnxruntime does with an input whose batch dimension is fixed at 1
        if len(feed["x"]) != 1:
            raise RuntimeError("Got invalid dimensions for input: x for the following indices index: 0 Got: 2 Expected: 1")
        return [np.zeros((1, 4), np.float32)]
    assert batch_size_within(_samples(5), 8, run) == 1


def test_batches_keep_their_size_and_split_on_shape_changes():
    samples = _samples(5) + _samples(3, shape=(1, 2))
    assert [n for _, n in batches(samples, 2)] == [2, 2, 1, 2, 1]
    assert [int(v) for feed, _ in batches(samples[:5], 2) for v in feed["x"][:, 0]] == list(range(5))
