"""Reference numbers: float vs onnxruntime ``quantize_static`` on the zoo.

    python tools/zoo_ort_baseline.py [names...] [--n-calib 64] [--out DIR]
        float model and ORT's defaults (QDQ, per-channel, MinMax, uint8
        activations / int8 weights), one line per model and variant
    python tools/zoo_ort_baseline.py [names...] --config best      [--config ...]
        named configurations of ``ORT_CONFIGS`` ("best" = the model's
        ``best_<name>``); ``--options '{"reduce_range": true}'`` for ad hoc ones
    python tools/zoo_ort_baseline.py [names...] --sweep [--results FILE.jsonl]
        every configuration of ``SWEEP`` (each quantization in its own process,
        with a time limit), one JSON record per (model, config) appended to
        FILE (configs already in FILE are skipped); ``--write-best tools/ort_best_configs.json`` then picks the best
        per model by ``HEADLINE`` from the records of FILE.

Calibration: ``n_calib`` samples of ``TASKS[name].calib_feeds`` (the same for
every configuration).  The quantized model is always evaluated as deployed:
a default ``onnxruntime.InferenceSession`` (all graph optimizations) on CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import onnxruntime as ort  # noqa: E402
from onnxruntime.quantization import (CalibrationDataReader,  # noqa: E402
                                      CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)

from zoo import fetch_model  # noqa: E402
from zoo_tasks import TASKS  # noqa: E402

_CMG = ["Conv", "MatMul", "Gemm"]
_S8SYM = {"activation_type": "QInt8", "extra_options": {"ActivationSymmetric": True}}

# Options of ``ort_quantize`` (JSON-able: enums by name).  per_channel=True
# and QDQ always; every key left out keeps quantize_static's default.
_BASE: dict[str, dict] = {
    "defaults": {},
    "rr": {"reduce_range": True},
    "cmg": {"op_types_to_quantize": _CMG},
    "rr_cmg": {"reduce_range": True, "op_types_to_quantize": _CMG},
    "entropy": {"calibrate_method": "Entropy"},
    "rr_entropy": {"reduce_range": True, "calibrate_method": "Entropy"},
    "percentile": {"calibrate_method": "Percentile"},
    "rr_percentile": {"reduce_range": True, "calibrate_method": "Percentile"},
    "s8sym": dict(_S8SYM),
    "rr_s8sym": {"reduce_range": True, **_S8SYM},
    "rr_movavg": {"reduce_range": True, "extra_options": {"CalibMovingAverage": True}},
}
# "pp_*": the same after ORT's recommended ``quant_pre_process``.  It matters
# for the Paddle models: their weights are Constant nodes, not initializers,
# so without it the quantizer treats every weight as an activation
# (per-tensor uint8 from calibration; per_channel / reduce_range do nothing).
ORT_CONFIGS: dict[str, dict] = {**_BASE, **{f"pp_{k}": {"pre_process": True, **v}
                                            for k, v in _BASE.items()}}
# Not swept: per-tensor weights, the one exception to per_channel=True (upgrade mode's per-tensor path on the
# zoo, tools/zoo_upgrade.py --configs pp_per_tensor).
ORT_CONFIGS["pp_per_tensor"] = {"pre_process": True, "per_channel": False}
# Winners of the sweep (tools/ort_best_configs.json has their metrics).
ORT_CONFIGS.update({
    "best_ppocr_rec": ORT_CONFIGS["pp_rr_cmg"],
    "best_yolov8n": ORT_CONFIGS["rr_cmg"],
    "best_ppocr_cls": ORT_CONFIGS["pp_defaults"],  # 2000-line sweep; the upgrade rows in docs ran "defaults"
    "best_orientation": ORT_CONFIGS["defaults"],
    "best_ppocr_det": ORT_CONFIGS["pp_rr_movavg"],
})
# What --sweep runs per model (pruned where the defaults already match float).
_PP = [f"pp_{k}" for k in _BASE]
SWEEP: dict[str, list[str]] = {
    "ppocr_rec": ["defaults", "rr", "cmg", *_PP],
    "ppocr_det": ["defaults", "rr", "cmg", *_PP],
    "yolov8n": [*_BASE, "pp_defaults", "pp_rr"],
    "ppocr_cls": ["defaults", "rr", "cmg", "rr_cmg", "pp_defaults", "pp_rr", "pp_cmg", "pp_rr_cmg"],
    "orientation": ["defaults", "rr", "pp_defaults", "pp_rr"],
}

# Ranking per model: compared as a tuple, first entry = headline metric.
HEADLINE: dict[str, tuple[str, ...]] = {
    "ppocr_rec": ("char_acc_en", "char_acc_zh"),
    "ppocr_cls": ("acc",),
    "orientation": ("acc",),
    "ppocr_det": ("map_iou", "gt_recall"),
    "yolov8n": ("recall", "precision", "score_cos"),
}


class _Reader(CalibrationDataReader):
    def __init__(self, feeds):
        name, x = next(iter(feeds.items()))
        self._it = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


def ort_quantize(model_path, feeds, out_path, **options) -> float:
    """quantize_static(model_path -> out_path) calibrated on *feeds*
    ({input: array[n, ...]}, one sample per calibration batch); returns the
    seconds it took.  *options*: quantize_static keyword arguments with enums
    given by name (``calibrate_method="Entropy"``, ``activation_type="QInt8"``)
    plus ``pre_process=True`` to run ORT's ``quant_pre_process`` first
    (without symbolic shape inference, which fails on ppocr_rec), after
    converting models of opset < 13 to opset 13."""
    opts = {"quant_format": QuantFormat.QDQ, "per_channel": True}
    for k, v in options.items():
        if k in ("activation_type", "weight_type") and isinstance(v, str):
            v = QuantType[v]
        elif k == "calibrate_method" and isinstance(v, str):
            v = CalibrationMethod[v]
        elif k == "quant_format" and isinstance(v, str):
            v = QuantFormat[v]
        elif k == "extra_options":
            v = dict(v)
        opts[k] = v
    t0 = time.perf_counter()
    src = str(model_path)
    if opts.pop("pre_process", False):
        from onnxruntime.quantization.shape_inference import quant_pre_process
        import onnx
        src = str(out_path) + ".pre.onnx"
        model = onnx.load(str(model_path))
        if _opset(model) < 13:     # per-axis Q/DQ (per_channel) needs opset 13
            model_path = str(out_path) + ".op13.onnx"
            onnx.save(onnx.version_converter.convert_version(model, 13), model_path)
        quant_pre_process(str(model_path), src, skip_symbolic_shape=True)
    quantize_static(src, str(out_path), _Reader(feeds), **opts)
    return time.perf_counter() - t0


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def config_options(name: str, config: str) -> dict:
    if config == "best":
        config = f"best_{name}" if f"best_{name}" in ORT_CONFIGS else "defaults"
    return ORT_CONFIGS[config]


class _CachedSession:
    """A float session whose outputs are memoized per input (the agreement
    metrics run the float model again on every evaluation)."""

    def __init__(self, sess):
        self._sess, self._cache = sess, {}

    def __getattr__(self, attr):
        return getattr(self._sess, attr)

    def run(self, names, feed):
        key = (tuple(names or ()),) + tuple(
            (k, v.shape, hash(np.ascontiguousarray(v).tobytes())) for k, v in feed.items())
        if key not in self._cache:
            self._cache[key] = self._sess.run(names, feed)
        return self._cache[key]


def ort_options(name: str, config: str, wbits: int) -> dict:
    """onnxruntime's options for ``config``; at 4 bits int4 weights, without reduce_range (which would leave
    them nine levels, [-4, 4])."""
    options = dict(config_options(name, config))
    if wbits == 4:
        options["weight_type"] = "QInt4"
        options.pop("reduce_range", None)
    return options


def _fmt(res):
    return ", ".join(f"{k}={v:.4f}" for k, v in res.items())


def _quiet():
    ort.set_default_logger_severity(3)
    logging.getLogger().setLevel(logging.ERROR)   # quantizer's root warnings


def _child(model_path, feeds_path, out_path, options, conn):
    _quiet()
    try:
        feeds = dict(np.load(feeds_path))
        conn.send(("ok", ort_quantize(model_path, feeds, out_path, **options)))
    except BaseException as exc:    # noqa: BLE001  (report, don't hang the parent)
        conn.send(("error", f"{type(exc).__name__}: {exc}"[:500]))


def _quantize_isolated(model_path, feeds_path, out_path, options, timeout):
    """ort_quantize in a spawned process: a blow-up (memory, time) of one
    configuration is recorded instead of ending the sweep."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(str(model_path), str(feeds_path),
                                         str(out_path), options, send))
    p.start()
    ok = recv.poll(timeout)
    msg = recv.recv() if ok else ("error", f"timeout after {timeout:.0f}s")
    if not ok:
        p.kill()
    p.join()
    if msg[0] == "ok":
        return msg[1], None
    return None, msg[1] if msg[1] else f"exit code {p.exitcode}"


def run_configs(name, configs, n_calib, out, timeout=None, log=None):
    """Quantize + evaluate model *name* with each (label, options) of
    *configs*; yields one record dict per configuration (float first)."""
    task, path = TASKS[name], fetch_model(name)
    fsess = _CachedSession(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    task.eval_set  # noqa: B018  (build the data outside the timing)
    t0 = time.perf_counter()
    yield {"model": name, "config": "float", "options": None,
           "metrics": task.evaluate(fsess, fsess),
           "eval_s": round(time.perf_counter() - t0, 1)}
    feeds = task.calib_feeds(path, n_calib)
    feeds_path = out / f"{name}.calib{n_calib}.npz"
    if timeout:
        np.savez(feeds_path, **feeds)
    for label, options in configs:
        qpath = out / f"{name}.{label}.onnx"
        rec = {"model": name, "config": label, "options": options}
        try:
            if timeout:
                qs, err = _quantize_isolated(path, feeds_path, qpath, options, timeout)
            else:
                qs, err = ort_quantize(path, feeds, qpath, **options), None
        except Exception as exc:   # noqa: BLE001
            qs, err = None, f"{type(exc).__name__}: {exc}"[:500]
        if err is None:
            try:
                qsess = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"])
                t0 = time.perf_counter()
                rec["metrics"] = task.evaluate(qsess, fsess)
                rec["eval_s"] = round(time.perf_counter() - t0, 1)
            except Exception as exc:   # noqa: BLE001
                err = f"evaluate: {type(exc).__name__}: {exc}"[:500]
        rec["quantize_s"] = None if qs is None else round(qs, 1)
        if err:
            rec["error"] = err
        yield rec


def write_best(records, path):
    """Best configuration per model (by HEADLINE, ties: the first tried) and
    the float and defaults metrics, from sweep records, merged into the JSON
    at *path* (models without records keep their entry)."""
    p = pathlib.Path(path)
    best = json.loads(p.read_text()) if p.is_file() else {}
    for name, keys in HEADLINE.items():
        recs = [r for r in records if r["model"] == name and "metrics" in r]
        quant = [r for r in recs if r["config"] != "float"]
        if not quant:
            continue
        win = max(quant, key=lambda r: tuple(r["metrics"][k] for k in keys))
        get = {r["config"]: r for r in recs}
        best[name] = {
            "headline": list(keys), "best_config": win["config"],
            "options": {"quant_format": "QDQ", "per_channel": True, **win["options"]},
            "metrics": win["metrics"], "quantize_s": win["quantize_s"],
            "defaults_metrics": get.get("defaults", {}).get("metrics"),
            "float_metrics": get.get("float", {}).get("metrics"),
            "n_configs_tried": len(quant)}
    pathlib.Path(path).write_text(json.dumps(best, indent=1) + "\n")
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--out", default=None, help="keep quantized models here")
    ap.add_argument("--config", action="append", default=[],
                    help="ORT_CONFIGS name (repeatable; 'best' = best_<model>)")
    ap.add_argument("--options", default=None, help="ad hoc options as JSON")
    ap.add_argument("--label", default="adhoc", help="name of --options")
    ap.add_argument("--sweep", action="store_true", help="the SWEEP configs")
    ap.add_argument("--timeout", type=float, default=1200,
                    help="seconds per quantization in --sweep")
    ap.add_argument("--results", default=None, help="append JSON records here")
    ap.add_argument("--write-best", default=None,
                    help="write the best config per model of --results here")
    args = ap.parse_args(argv)
    if args.write_best:
        recs = [json.loads(s) for s in open(args.results) if s.strip()]
        for name, b in write_best(recs, args.write_best).items():
            print(f"{name}: {b['best_config']} {_fmt(b['metrics'])}")
        return 0
    _quiet()
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="qwt2-ortq-"))
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(TASKS):
        if args.sweep:
            configs = [(c, ORT_CONFIGS[c]) for c in SWEEP[name]]
        else:
            configs = [(c, config_options(name, c)) for c in args.config]
        if args.options:
            configs.append((args.label, json.loads(args.options)))
        configs = configs or [("defaults", {})]
        done = set()
        if args.results and pathlib.Path(args.results).is_file():   # resume
            done = {(r["model"], r["config"]) for r in map(json.loads, open(args.results))}
        configs = [c for c in configs if (name, c[0]) not in done]
        timeout = args.timeout if args.sweep or args.options else None
        for rec in run_configs(name, configs, args.n_calib, out, timeout):
            res = _fmt(rec["metrics"]) if "metrics" in rec else "FAILED " + rec["error"]
            print(f"{name} {rec['config']}: {res}  (quantize {rec.get('quantize_s')}s,"
                  f" eval {rec.get('eval_s')}s)", flush=True)
            if args.results and (name, rec["config"]) not in done:
                with open(args.results, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
