"""Prove the > 2 GB path once: generate a float model over protobuf's 2 GB limit (external data), compile it,
run the result.  Writes a markdown block for docs/ROBUSTNESS.md to stdout.

    python tools/big_model_check.py [--dim 14000] [--layers 3] [--dir DIR] [--no-cwac]

The model: x[N,D] ─► (MatMul(W_i[D,D]) ─► Relu)* ─► y, float32 weights of 4·D² bytes each
(D=14000, 3 layers: 2.35 GB).  Everything is written under --dir (default: a temporary folder, removed).
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwt2_onnx import CompileConfig, compile_model
from qwt2_onnx.config import CwacConfig
from qwt2_onnx.runtime import make_session


def build(dim: int, layers: int, path: Path) -> int:
    rng = np.random.default_rng(0)
    nodes, inits, t = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes += [helper.make_node("MatMul", [t, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        t = f"r{i}"
    nodes.append(helper.make_node("Identity", [t], ["y"], name="out"))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return (path.with_name(path.name + ".data")).stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=14000)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--no-cwac", action="store_true")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="qwt2-big-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "big.onnx"
        t0 = time.perf_counter()
        size = build(args.dim, args.layers, src)
        x = np.random.default_rng(1).standard_normal((args.samples, args.dim)).astype(np.float32)
        np.savez(work / "calib.npz", x=x)
        t1 = time.perf_counter()
        cfg = CompileConfig(cwac=CwacConfig(enabled=not args.no_cwac))
        res = compile_model(src, work / "calib.npz", work / "big.int8.onnx", cfg)
        t2 = time.perf_counter()
        out_files = sorted(p.name for p in work.iterdir() if p.name.startswith("big.int8"))
        data = work / "big.int8.onnx.data"
        y = make_session(str(work / "big.int8.onnx")).run(None, {"x": x[:2]})[0]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        d = res.fidelity.deployed["y"]
        print(f"| float model | {size / 2**30:.2f} GiB external data ({args.layers} MatMul {args.dim}x{args.dim}) |")
        print(f"| compile | {t2 - t1:.0f} s, CWAC {'off' if args.no_cwac else 'on'}, peak RSS {peak:.1f} GiB |")
        print(f"| output files | {', '.join(out_files)} |")
        print(f"| output external data | {data.stat().st_size / 2**20:.0f} MiB |" if data.exists() else
              "| output external data | none |")
        print(f"| runs in onnxruntime | output {list(y.shape)}, deployed SQNR vs float {d.sqnr_db:.1f} dB |")
        print(f"| generating the model | {t1 - t0:.0f} s |")
        return 0
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
