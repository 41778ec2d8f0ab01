"""Reference numbers: float vs onnxruntime ``quantize_static`` on the zoo.

    python tools/zoo_ort_baseline.py [names...] [--n-calib 64] [--out DIR]

For each zoo model: evaluate the float model, quantize it with
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, MinMax,
uint8 activations / int8 weights = its defaults) on ``n_calib`` samples of
``TASKS[name].calib_feeds`` and evaluate the result with default session
options (all graph optimizations).  Prints one line per model and variant.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import onnxruntime as ort  # noqa: E402
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat,  # noqa: E402
                                      quantize_static)

from zoo import fetch_model  # noqa: E402
from zoo_tasks import TASKS  # noqa: E402


class _Reader(CalibrationDataReader):
    def __init__(self, feeds):
        name, x = next(iter(feeds.items()))
        self._it = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


def _fmt(res):
    return ", ".join(f"{k}={v:.4f}" for k, v in res.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--out", default=None, help="keep quantized models here")
    args = ap.parse_args(argv)
    ort.set_default_logger_severity(3)
    logging.getLogger().setLevel(logging.ERROR)   # quantizer's root warnings
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="qwt2-ortq-"))
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(TASKS):
        task = TASKS[name]
        path = fetch_model(name)
        fsess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        task.eval_set  # noqa: B018  (build the data outside the timing)
        t0 = time.perf_counter()
        res = task.evaluate(fsess, fsess)
        print(f"{name} float: {_fmt(res)}  ({time.perf_counter() - t0:.1f}s)",
              flush=True)
        qpath = out / f"{name}.ortq.onnx"
        feeds = task.calib_feeds(path, args.n_calib)
        quantize_static(str(path), str(qpath), _Reader(feeds),
                        quant_format=QuantFormat.QDQ, per_channel=True)
        qsess = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"])
        t0 = time.perf_counter()
        res = task.evaluate(qsess, fsess)
        print(f"{name} ort-qdq: {_fmt(res)}  ({time.perf_counter() - t0:.1f}s)",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
