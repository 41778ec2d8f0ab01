"""``qwt2-onnx bench``: the comparison against onnxruntime's quantizer on the user's model (``bench``)."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), required=True, help=".npz, or a folder of .npy/.npz/images.")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), default=None,
              help="Evaluation samples (the --calib formats) [the calibration samples].")
@click.option("--task", default=None, metavar="MODULE:NAME",
              help="Task metric: an object or class with evaluate(session, float_session) -> {metric: value}.")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), default=None,
              help="Write bench.md and bench.json into this folder.")
@click.option("--latency-runs", type=int, default=30, show_default=True, help="Timed runs per model (0: no latency).")
@click.option("--compile-arg", "compile_args", multiple=True, metavar="ARG",
              help="Passed to both qwt2-onnx compiles (repeatable), e.g. --compile-arg=--target --compile-arg=trt.")
def bench_cmd(model, calib, eval_data, task, output_dir, latency_runs, compile_args) -> None:
    """Compile MODEL three ways (onnxruntime quantize_static, ours --no-cwac, ours) and compare them:
    compile time, peak RSS, fidelity vs float, latency."""
    from .bench import load_task, run_bench
    from .errors import QwtError

    if latency_runs < 0:
        raise QwtError(f"--latency-runs {latency_runs} is negative", fix="pass 0 (no latency) or more")
    report = run_bench(model, calib, eval_data=eval_data, task=load_task(task) if task else None,
                       out_dir=output_dir, latency_runs=latency_runs, extra_args=tuple(compile_args))
    click.echo(report.markdown())
    if output_dir is not None:
        click.echo(f"written: {output_dir / 'bench.md'}, {output_dir / 'bench.json'}")
