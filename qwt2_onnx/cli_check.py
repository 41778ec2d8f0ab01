"""``qwt2-onnx check`` and ``qwt2-onnx diff``: two models on the same samples, a verdict and a report."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from .calib_data import InputSpec, open_calibration, random_calibration
from .errors import QwtError
from .model_io import load_model


def _check_data(model: Path, data: Path | None, random_data: int | None, seed: int):
    """--data, or --random-data N (seeded, loudly): the samples a check runs on, and the seed if generated."""
    if (data is None) == (random_data is None):
        raise QwtError("pass exactly one of --data DATA and --random-data N", fix="--data takes the --calib formats")
    specs = InputSpec.from_model(load_model(model))
    if random_data is not None:
        if random_data < 1:
            raise QwtError(f"--random-data {random_data}: at least one sample is needed", fix="e.g. --random-data 16")
        click.secho(f"WARNING: checking on {random_data} random samples (seed {seed}); real data exercises the "
                    "ranges the model sees.", fg="yellow", err=True)
        return random_calibration(specs, random_data, seed=seed), seed
    return open_calibration(data, specs), None


def _tolerances(atol: tuple[str, ...], rtol: tuple[str, ...], statistic: str, default_rtol: float) -> dict:
    """--atol/--rtol as VALUE (all outputs) or NAME=VALUE (one output or part) -> {name or '*': Tolerance}."""
    from .diffstats import Tolerance

    values: dict[str, dict[str, float]] = {"*": {"atol": 0.0, "rtol": default_rtol}}
    for kind, items in (("atol", atol), ("rtol", rtol)):
        for item in items:
            name, _, value = item.rpartition("=") if "=" in item else ("*", "", item)
            try:
                number = float(value)
            except ValueError:
                raise click.BadParameter(f"--{kind} {item!r}: expected VALUE or NAME=VALUE") from None
            if not (math.isfinite(number) and number >= 0):
                raise QwtError(f"--{kind} {item!r}: a tolerance must be a finite number >= 0", fix=f"e.g. --{kind} 0.05")
            values.setdefault(name, dict(values["*"]))[kind] = number
    return {name: Tolerance(v["atol"], v["rtol"], statistic) for name, v in values.items()}


def _check_run(data: Path | None, report_dir: Path | None, batch_size: int, models: list[tuple[Path, str]]) -> None:
    """``check`` / ``diff``: options and the report folder checked before any model runs."""
    from .run_paths import Access, check_run_paths, data_files, model_files

    if batch_size < 1:
        raise QwtError(f"--batch-size {batch_size} is out of range", fix="pass a whole number of samples >= 1")
    if report_dir is None:
        return
    if report_dir.exists() and not report_dir.is_dir():
        raise QwtError(f"--report {report_dir} is not a folder", fix="pass a folder (it is created if missing)")
    reads = [a for path, role in models for a in model_files(path, role)] + data_files(data, "data")
    writes = [Access(report_dir / "report.json", "JSON report"), Access(report_dir / "report.html", "HTML report")]
    check_run_paths(reads, writes if report_dir.is_dir() else [Access(report_dir, "report folder")])


def _same_interface(a, b, names: tuple[str, str]) -> None:
    """Two models compared on the same samples must take the same inputs and give the same outputs."""
    sa, sb = InputSpec.from_model(a), InputSpec.from_model(b)
    ia, ib = {s.name: s for s in sa}, {s.name: s for s in sb}
    problems = []
    if set(ia) != set(ib):
        problems.append(f"inputs: {names[0]} {sorted(ia)}, {names[1]} {sorted(ib)}")
    for name in sorted(set(ia) & set(ib)):
        x, y = ia[name], ib[name]
        fixed_clash = len(x.shape) != len(y.shape) or any(
            isinstance(p, int) and isinstance(q, int) and p > 0 and q > 0 and p != q for p, q in zip(x.shape, y.shape))
        if x.dtype != y.dtype or fixed_clash:
            problems.append(f"input '{name}': {names[0]} {x.dtype} {x.shape_str()}, {names[1]} {y.dtype} {y.shape_str()}")
    oa, ob = [o.name for o in a.graph.output], [o.name for o in b.graph.output]
    if set(oa) != set(ob):
        problems.append(f"outputs: {names[0]} {oa}, {names[1]} {ob}")
    if problems:
        raise QwtError(f"the {names[0]} and {names[1]} models do not have the same interface", notes=problems,
                       fix="compare models with the same input names, types and shapes and the same output names")


def _write_report(report, directory: Path | None) -> None:
    from .model_io import save_text_atomic
    from .render import render_terminal
    from .report import dumps, render_html

    click.echo(render_terminal(report))
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        save_text_atomic(dumps(report), directory / "report.json")
        save_text_atomic(render_html(report), directory / "report.html")
        click.echo(f"report: {directory / 'report.json'}, {directory / 'report.html'}")


_DATA_OPTIONS = [
    click.option("--data", type=click.Path(path_type=Path), help="Samples: the --calib formats."),
    click.option("--random-data", type=int, default=None, metavar="N", help="N seeded random samples instead."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
                 help="Write report.json and report.html into this folder."),
    click.option("--atol", multiple=True, help="VALUE or OUTPUT=VALUE (repeatable)."),
    click.option("--rtol", multiple=True, help="VALUE or OUTPUT=VALUE (repeatable)."),
    click.option("--statistic", type=click.Choice(["max", "p99", "mean"]), default="max", show_default=True,
                 help="Which statistic of |Δ| the tolerance bounds."),
    click.option("--batch-size", type=int, default=8, show_default=True,
                 help="Samples per run, at most: fewer where one batch's fetched tensors would exceed 64 MiB."),
]


def _data_options(f):
    for option in reversed(_DATA_OPTIONS):
        f = option(f)
    return f


@click.command("check")
@click.argument("fused", type=click.Path(path_type=Path))
@click.argument("unfused", type=click.Path(path_type=Path))
@_data_options
def check_cmd(fused, unfused, data, random_data, seed, report_dir, atol, rtol, statistic, batch_size) -> None:
    """Prove FUSED (CWAC folded) computes what UNFUSED (explicit Mul/Add) does.  Exit 0 pass, 1 fail, 2 error."""
    from .checker import CheckReport, check, data_summary, now

    _check_run(data, report_dir, batch_size, [(fused, "fused model"), (unfused, "unfused model")])
    tol = _tolerances(atol, rtol, statistic, 1e-5)["*"]
    fm, um = load_model(fused), load_model(unfused)
    _same_interface(fm, um, ("fused", "unfused"))
    samples, used_seed = _check_data(unfused, data, random_data, seed)
    comparisons = check(fm, um, samples, tol, batch_size)
    report = CheckReport("check", {"fused": str(fused), "unfused": str(unfused)},
                         data_summary(samples, batch_size, used_seed), comparisons, now())
    _write_report(report, report_dir)
    sys.exit(0 if report.passed else 1)


@click.command("diff")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@_data_options
@click.option("--output-part", multiple=True, help="NAME=OUTPUT:axis=A:START:STOP, e.g. boxes=output0:axis=1:0:4.")
@click.option("--simulated", is_flag=True, help="Run CANDIDATE with optimizations off (float simulation).")
def diff_cmd(reference, candidate, data, random_data, seed, report_dir, atol, rtol, statistic, batch_size,
             output_part, simulated) -> None:
    """Numerical diff of two models with the same interface (e.g. float vs int8).  Exit 0 pass, 1 fail, 2 error."""
    from .checker import CheckReport, OutputPart, data_summary, diff, now

    _check_run(data, report_dir, batch_size, [(reference, "reference model"), (candidate, "candidate model")])
    parts = tuple(OutputPart.parse(p) for p in output_part)
    tols = _tolerances(atol, rtol, statistic, 1e-5)
    rm, cm = load_model(reference), load_model(candidate)
    _same_interface(rm, cm, ("reference", "candidate"))
    samples, used_seed = _check_data(reference, data, random_data, seed)
    comp = diff(rm, cm, samples, tols, parts, batch_size,
                deployed=not simulated)
    unknown = sorted(set(tols) - {"*"} - set(comp.outputs))
    if unknown:
        raise QwtError(f"tolerance for unknown output(s) {', '.join(unknown)}",
                       notes=[f"outputs and parts: {', '.join(comp.outputs)}"], fix="use one of those names")
    report = CheckReport("diff", {"reference": str(reference), "candidate": str(candidate)},
                         data_summary(samples, batch_size, used_seed), [comp], now())
    _write_report(report, report_dir)
    sys.exit(0 if report.passed else 1)
