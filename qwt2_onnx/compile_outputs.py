"""What a compile writes, and the check that it may: every path the run writes against every path it reads,
before any work (``check_paths``), and the model, unfused model and reports placed together or not at all
(``write_outputs``)."""
from __future__ import annotations

from pathlib import Path

from .config import CompileConfig
from .errors import CheckFailed
from .model_io import AtomicOutputs
from .report import dumps, render_html
from .run_paths import Access, check_run_paths, data_files, model_files

FOLD_TOLERANCE = 1e-5  # fused vs unfused, same activation codes, max relative difference at any output
# ... plus, at graph outputs only, a few float32 ulps of 1: an output far smaller than the values it is
# computed from (a Sigmoid or Softmax near 0, a difference of two O(1) numbers) carries their absolute
# rounding, 2^-24 and up (openwakeword's hey_mycroft head: max|y| 3.5e-5, |Δ| 6e-8 = 2^-24 with identical
# codes).  Fold errors cannot hide under it: every compensated layer's own output is checked relatively.
FOLD_OUTPUT_ATOL = 4 * 2.0 ** -23


def check_paths(config: CompileConfig, output_path: Path, unfused_path, models: list[tuple[Path, str]],
                calib) -> None:
    """Every path the run will write against every path it reads, before any work (``run_paths``)."""
    reads = [a for path, role in models for a in model_files(path, role)] + data_files(calib, "calibration data")
    if config.cwac.params is not None:
        reads.append(Access(Path(config.cwac.params), "--cwac-params file"))
    if config.calib.range_overrides is not None:
        reads.append(Access(Path(config.calib.range_overrides), "--act-ranges file"))
    writes = [Access(output_path, "output model"),
              Access(output_path.with_name(output_path.name + ".data"), "output model's external data")]
    if config.check:
        writes += [Access(p, f"{kind} report") for p, kind in zip(report_paths(output_path), ("JSON", "HTML"))]
    if unfused_path is not None:
        unfused_path = Path(unfused_path)
        writes += [Access(unfused_path, "unfused model"),
                   Access(unfused_path.with_name(unfused_path.name + ".data"), "unfused model's external data")]
    check_run_paths(reads, writes)


def write_outputs(qmodel, unfused, report, fold, output_path: Path, unfused_path, external: bool,
           external_above: int | None) -> None:
    """The model only when the check passed (a failing model is never written, its report is); all
    outputs land together or not at all."""
    failed = (report is not None and not report.passed) or \
        (fold is not None and not fold.passes(FOLD_TOLERANCE, FOLD_OUTPUT_ATOL))
    with AtomicOutputs() as outputs:
        if report is not None:
            json_path, html_path = report_paths(output_path)
            outputs.text(dumps(report), json_path)
            outputs.text(render_html(report), html_path)
        if not failed:
            outputs.model(qmodel, output_path, external=external, external_above=external_above)
            if unfused is not None:
                outputs.model(unfused, Path(unfused_path), external=external, external_above=external_above)
        outputs.commit()
    if failed:
        lines = [v.line() for v in (report.verdicts if report else []) if not v.passed][:10]
        raise CheckFailed("the folded model does not compute what the unfused model computes; nothing was written",
                          notes=lines or [f"max relative difference {fold.worst_forced:.3g} > {FOLD_TOLERANCE:g}"],
                          fix=f"see the report {report_paths(output_path)[1]}" if report else
                          "report this as a bug; --no-cwac writes the plain QDQ model meanwhile")


def report_paths(output_path: Path) -> tuple[Path, Path]:
    """Where the check report goes: beside the model, ``OUT.report.json`` and ``OUT.report.html``."""
    stem = output_path.name.removesuffix(".onnx")
    return output_path.with_name(stem + ".report.json"), output_path.with_name(stem + ".report.html")
