"""``compile_model``: the stages of DESIGN.md, top to bottom.

    load ─► normalize ─► simplify ─► fold BN ─► plan ─► calibrate ─► insert Q/DQ
         ─► fit CWAC ─► fold CWAC ─► lint (trt) ─► verify ─► write ─► onnxruntime fusion report

``verify`` is one pass over the evaluation samples (:mod:`verify`): the fused vs unfused fold check that
gates the write, the report's comparisons and the fidelity summary.

Each stage's failure is re-raised as a ``StageError`` naming the stage.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from .calib_data import CalibrationSet, InputSpec, open_calibration
from .calibrate import collect_ranges
from .checker import CheckReport, data_summary, fold_comparisons, now
from .config import CompileConfig
from .cwac.fit import check_position_mask, fit_compensations
from .cwac.fold import build_graphs, constrain_full_range
from .cwac.gate import gate_given
from .cwac.params import load_cwac_params
from .cwac.records import CwacFit
from .diffstats import Tolerance
from .errors import CheckFailed, QwtError, StageError
from .fidelity import FidelityReport
from .graph_io import export_model
from .inspect_ort import FusionReport, fusion_report
from .model_io import AtomicOutputs, read_model
from .passes.declared_types import repair_from_run
from .passes.fold_batchnorm import FoldBatchNormPass
from .passes.fold_constant_quantizers import FoldConstantQuantizersPass
from .passes.insert_qdq import InsertQDQPass
from .passes.normalize import NormalizePass
from .passes.simplify import SimplifyPass
from .passes.trt_lint import TrtLintPass
from .policy import QuantPlan, coarse_weight_grids, plan_from_qdq, plan_quantization, quantized_op_types
from .report import dumps, render_html
from .run_paths import Access, check_run_paths, data_files, model_files
from .runtime import try_run
from .verify import Verification, verify_compile

logger = logging.getLogger(__name__)

MIN_CWAC_SAMPLES = 4  # fewer cannot be split into a fit part and a held-out part (cwac.gate.Parts)
FOLD_TOLERANCE = 1e-5  # fused vs unfused, same activation codes, max relative difference at any output
# ... plus, at graph outputs only, a few float32 ulps of 1: an output far smaller than the values it is
# computed from (a Sigmoid or Softmax near 0, a difference of two O(1) numbers) carries their absolute
# rounding, 2^-24 and up (openwakeword's hey_mycroft head: max|y| 3.5e-5, |Δ| 6e-8 = 2^-24 with identical
# codes).  Fold errors cannot hide under it: every compensated layer's own output is checked relatively.
FOLD_OUTPUT_ATOL = 4 * 2.0 ** -23


@dataclasses.dataclass
class CompileResult:
    output_path: Path
    model: onnx.ModelProto
    float_model: onnx.ModelProto
    plan: QuantPlan
    stages: dict[str, dict]
    fusion: FusionReport | None
    fidelity: FidelityReport | None
    seconds: dict[str, float]
    cwac: CwacFit | None = None
    plain_model: onnx.ModelProto | None = None  # the plain QDQ model (before CWAC)
    report: CheckReport | None = None


@contextlib.contextmanager
def _stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except (StageError, CheckFailed, MemoryError, OSError):  # the CLI says what each of these means
        raise
    except QwtError as e:
        raise StageError(name, e) from None
    except Exception as e:  # our bug, but say where it happened; keep the traceback
        raise RuntimeError(f"stage '{name}' failed: {type(e).__name__}: {e}") from e
    finally:
        seconds[name] = round(time.perf_counter() - start, 3)
    logger.info("stage %-10s %.2fs", name, seconds[name])


CHECK_SAMPLES = 16  # what the checks and the fidelity summary run on when nothing is held out


def split_holdout(data: CalibrationSet, holdout: int) -> tuple[CalibrationSet, CalibrationSet, bool]:
    """(calibration part, evaluation part, whether the evaluation part is held out).  With too few samples
    to hold ``holdout`` out, or ``holdout`` 0, everything calibrates and the checks run on the first
    ``max(holdout, CHECK_SAMPLES)`` calibration samples (not held out: the report says so)."""
    n = data.length
    if n is not None and holdout > 0 and n >= 2 * holdout:
        return data.take(0, n - holdout), data.take(n - holdout, n), True
    return data, data.take(0, max(holdout, CHECK_SAMPLES)), False


def compile_model(model_path: str | Path, calib, output_path: str | Path, config: CompileConfig = CompileConfig(),
                  *, image_preprocess=None, progress: Callable[[int, int | None], None] | None = None,
                  measure: bool = True, unfused_path: str | Path | None = None) -> CompileResult:
    """Compile a float ONNX model into a deployable QDQ model (see module doc).

    ``unfused_path``: also write the unfused graph (explicit CWAC Mul/Add ops)."""
    qcfg = config.quant
    seconds: dict[str, float] = {}
    stages: dict[str, dict] = {}
    model_path, output_path = Path(model_path), Path(output_path)
    check_paths(config, output_path, unfused_path, [(model_path, "input model")], calib)
    with _stage("load", seconds):
        repairs: list[str] = []
        model, external = read_model(model_path, repairs)  # big models keep their weights beside the graph, out as in
        stages["load"] = {"repaired_declarations": repairs}
        _refuse_quantized(model, model_path)
        specs = InputSpec.from_model(model)
        data = calib if isinstance(calib, CalibrationSet) else open_calibration(calib, specs, image_preprocess)
        data.validate()  # every sample: names, shapes, dtypes, NaN/Inf, before any heavy work
        check_position_mask(config.cwac, specs, data)
        stages["load"]["warnings"] = data.warnings()
        _read_parameter_files(config)
        repairs += repair_from_run(model, try_run(model, next(iter(data))))  # what inference could not see, a run shows
    with _stage("normalize", seconds):
        result = NormalizePass(qcfg.min_opset)(model)
        del model  # each stage's input is dropped once used: big models are held in memory a few times only
        stages["normalize"] = result.stats
        result = SimplifyPass(config.simplify)(result.graph)
        stages["simplify"] = result.stats
        graph = gs.import_onnx(result.graph)
        del result
        stages["fold_bn"] = FoldBatchNormPass()(graph).stats
        float_model = export_model(graph)
    with _stage("plan", seconds):
        plan = plan_quantization(graph, qcfg)
        stages["plan"] = {"layers": len(plan.layers), "skipped": dict(plan.skipped),
                          "unmatched_patterns": plan.unmatched_patterns, "left_float": dict(plan.left_float)}
        if not plan.layers:
            raise QwtError("the model has no layer that can be quantized",
                           notes=[f"{name}: {why}" for name, why in list(plan.skipped.items())[:10]]
                           or ["no Conv, ConvTranspose, Gemm or MatMul with a constant weight"],
                           fix="check the exclusions (--exclude, --exclude-op); a model without such layers gains nothing")
    calib_part, eval_part, held_out = split_holdout(data, config.holdout_samples)
    with _stage("calibrate", seconds):
        overrides = _range_overrides(config, plan)
        ranges = collect_ranges(float_model, [t for t in plan.activation_tensors if t not in overrides],
                                calib_part, config.calib, progress)
        ranges.update(overrides)
        if overrides:
            stages["calibrate"] = {"range_overrides": len(overrides)}
    with _stage("insert_qdq", seconds):
        stages["insert_qdq"] = InsertQDQPass(plan, ranges, qcfg)(graph).stats
        plain = export_model(graph)
    return _compensate_and_write(float_model, plain, plan, calib_part, eval_part, held_out, config, output_path,
                                 unfused_path, measure, seconds, stages, external)


def upgrade_model(qdq_path: str | Path, float_path: str | Path, calib, output_path: str | Path,
                  config: CompileConfig = CompileConfig(), *, image_preprocess=None, measure: bool = True,
                  unfused_path: str | Path | None = None) -> CompileResult:
    """Upgrade mode: fit and fold CWAC on a model another tool already quantized to QDQ (e.g. onnxruntime's
    ``quantize_static``), on that model's own quantization grid, against its float original.  Nothing but
    the compensated layers' weight scales, weight signs and biases changes."""
    seconds: dict[str, float] = {}
    stages: dict[str, dict] = {}
    qdq_path, float_path, output_path = Path(qdq_path), Path(float_path), Path(output_path)
    check_paths(config, output_path, unfused_path, [(qdq_path, "input model"), (float_path, "float model")], calib)
    if config.calib.range_overrides is not None:
        raise QwtError("activation range overrides have no effect in upgrade mode",
                       notes=["the QDQ model's own activation quantizers are kept as they are"],
                       fix="drop --act-ranges, or compile the float model instead")
    with _stage("load", seconds):
        (qmodel, external), fmodel = read_model(qdq_path), read_model(float_path)[0]
        if "DequantizeLinear" not in {n.op_type for n in qmodel.graph.node}:
            raise QwtError(f"{qdq_path.name} is not a QDQ model (no DequantizeLinear)",
                           fix="upgrade mode takes a QDQ-quantized model; compile a float model without --float-model")
        specs = InputSpec.from_model(fmodel)
        if [s.name for s in specs] != [s.name for s in InputSpec.from_model(qmodel)]:
            raise QwtError("the QDQ model and the float model have different inputs",
                           notes=[f"QDQ: {[s.name for s in InputSpec.from_model(qmodel)]}", f"float: {[s.name for s in specs]}"],
                           fix="pass the float model the QDQ model was quantized from (--float-model)")
        data = calib if isinstance(calib, CalibrationSet) else open_calibration(calib, specs, image_preprocess)
        data.validate()
        check_position_mask(config.cwac, specs, data)
        _read_parameter_files(config)
    with _stage("normalize", seconds):
        float_model, plain, stages["normalize"] = normalize_upgrade_inputs(qmodel, fmodel)
    with _stage("plan", seconds):
        plan, coarse = plan_upgrade(plain, float_model)
        stages["plan"] = {"layers": len(plan.layers), "skipped": dict(plan.skipped), "unmatched_patterns": [],
                          "coarse_weight_grids": coarse}
        if not plan.layers:
            raise QwtError("no quantized layer of the QDQ model has a float counterpart to fit against",
                           notes=[f"{name}: {why}" for name, why in list(plan.skipped.items())[:10]],
                           fix="pass the float model the QDQ model was quantized from; node names must match")
        # a bias-free layer that onnxruntime runs in float gets a float bias, not one more DQ op in the graph
        float_layers = frozenset(fusion_report(plain, plan.integer_weights(plain)).float_) \
            if config.quant.target == "ort" and config.cwac.enabled else frozenset()
    calib_part, eval_part, held_out = split_holdout(data, config.holdout_samples)
    return _compensate_and_write(float_model, plain, plan, calib_part, eval_part, held_out, config, output_path,
                                 unfused_path, measure, seconds, stages, external, float_layers)


def normalize_upgrade_inputs(qmodel: onnx.ModelProto, fmodel: onnx.ModelProto) -> tuple:
    """Upgrade mode's inputs at opset 13, the QDQ model's ``Q(constant)`` weights folded to integer
    constants: (float model, plain QDQ model, the fold's stats)."""
    result = FoldConstantQuantizersPass()(NormalizePass(13)(qmodel).graph)
    return NormalizePass(13)(fmodel).graph, export_model(gs.import_onnx(result.graph).toposort()), result.stats


def plan_upgrade(plain: onnx.ModelProto, float_model: onnx.ModelProto) -> tuple[QuantPlan, dict[str, dict]]:
    """The QDQ model's layers (``plan_from_qdq``) and its coarse per-tensor weight grids
    (``coarse_weight_grids``)."""
    plain_graph = gs.import_onnx(plain)
    plan = plan_from_qdq(plain_graph, gs.import_onnx(float_model))
    return plan, coarse_weight_grids(plain_graph, plan)


def _compensate_and_write(float_model, plain, plan, calib_part, eval_part, held_out, config, output_path,
                          unfused_path, measure, seconds, stages, external: bool,
                          float_bias: frozenset[str] = frozenset()) -> CompileResult:
    """fit CWAC ─► fold ─► lint ─► check (report) ─► write ─► fusion report ─► fidelity.  ``float_bias``: the
    layers onnxruntime runs in float (upgrade mode; see ``FoldCompensationPass``)."""
    qcfg = config.quant
    cwac, unfused, fused, fold = None, plain, plain, None
    fit_samples = calib_part.length if calib_part.length is not None else sum(1 for _ in calib_part)
    if config.cwac.enabled and config.cwac.params is None and fit_samples < MIN_CWAC_SAMPLES:
        stages.setdefault("load", {}).setdefault("warnings", []).append(
            f"CWAC not fitted: {fit_samples} calibration samples cannot be split into a fit part and a held-out "
            f"part that judges it (at least {MIN_CWAC_SAMPLES} are needed); this is the plain PTQ model")
        config = dataclasses.replace(config, cwac=dataclasses.replace(config.cwac, enabled=False))
    if config.cwac.enabled:
        with _stage("cwac_fit", seconds):
            cwac = _fit(float_model, plain, plan, calib_part, config)
            stages["cwac_fit"] = cwac.summary(len(plan.layers))
        with _stage("fold", seconds):
            unfused, fused, stages["fold"] = build_graphs(plain, cwac.compensations, int32_bias=qcfg.target == "ort",
                                                          float_bias=float_bias)
    with _stage("lint", seconds):
        qmodel = _lint_and_export(gs.import_onnx(fused), qcfg)
    report = checks = None
    if fused is not plain or config.check or measure:
        with _stage("verify", seconds):  # the fold check, the report's comparisons, the fidelity summary: one pass
            checks = verify_compile(float_model, plain, qmodel, unfused if fused is not plain else None, eval_part,
                                    report=config.check, fidelity=measure, held_out=held_out)
            fold = checks.fold
            if fold is not None:
                stages["fold"]["check"] = fold.summary()
            if config.check:
                report = _compile_report(checks, cwac, stages, eval_part, config)
    with _stage("write", seconds):
        _write(qmodel, unfused if unfused_path else None, report, fold, output_path, unfused_path,
               external, config.external_data_above)
    fusion = None
    if measure:
        with _stage("inspect", seconds):
            fusion = fusion_report(qmodel, plan.integer_weights(qmodel))
    fidelity: FidelityReport | None = checks.fidelity if checks is not None else None
    return CompileResult(output_path, qmodel, float_model, plan, stages, fusion, fidelity, seconds, cwac, plain, report)


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


def _read_parameter_files(config: CompileConfig) -> None:
    """``--cwac-params`` / ``--act-ranges`` read once at load (a bad file fails before calibration); the
    stages that use them read them again against the plan."""
    from .calib_data import read_small_npz

    for path, what in ((config.cwac.params, "CWAC parameters file (--cwac-params)"),
                       (config.calib.range_overrides, "activation ranges file (--act-ranges)")):
        if path is not None:
            read_small_npz(path, what, "pass the .npz the option documents")


def _range_overrides(config: CompileConfig, plan: QuantPlan) -> dict:
    """Activation ranges given from outside (``CalibConfig.range_overrides``, ``--act-ranges``)."""
    if config.calib.range_overrides is None:
        return {}
    from .range_overrides import load_range_overrides

    return load_range_overrides(config.calib.range_overrides, plan)


def _fit(float_model, plain, plan, calib_part, config) -> CwacFit:
    if config.cwac.params is not None:  # fitted elsewhere: the same output gate as a fitted compensation
        cwac = gate_given(float_model, plain, load_cwac_params(config.cwac.params, plan, plain), calib_part,
                          config.cwac, config.calib.batch_size)
    else:
        cwac = fit_compensations(float_model, plain, plan, calib_part, config.cwac, config.calib.batch_size)
    comps, constrained = constrain_full_range(plain, cwac.compensations)
    return dataclasses.replace(cwac, compensations=comps, full_range_left_alone=constrained)


def _lint_and_export(graph: gs.Graph, qcfg) -> onnx.ModelProto:
    if qcfg.target == "trt":
        violations = TrtLintPass()(graph).stats["violations"]
        if violations:
            raise QwtError("the graph breaks TensorRT's quantization rules; nothing was written",
                           notes=violations[:10], fix="report this as a bug: --target trt should never produce it")
    qmodel = export_model(graph)
    qmodel.producer_name, qmodel.producer_version = "qwt2-onnx", "0.1.0"
    onnx.checker.check_model(qmodel, full_check=True)
    return qmodel


def _compile_report(checks: Verification, cwac, stages, data, config) -> CheckReport:
    """Comparisons 1-3 of DESIGN.md §5 on the evaluation samples, plus the per-layer CWAC records."""
    tol = Tolerance(rtol=FOLD_TOLERANCE)
    comparisons = []
    if checks.fold is not None:
        comparisons += fold_comparisons(checks.fold, tol, ("unfused", "fused"),
                                        Tolerance(atol=FOLD_OUTPUT_ATOL, rtol=FOLD_TOLERANCE))
    comparisons += [c for c in (checks.deployed, checks.plain_vs_float, checks.cwac_vs_float) if c is not None]
    layers = cwac.layer_rows(stages["fold"]["strategies"]) if cwac is not None else []
    return CheckReport("compile", {"output": "the compiled model"}, data_summary(data, config.calib.batch_size),
                       comparisons, now(), layers, cwac.gate_record() if cwac is not None else None)


def _write(qmodel, unfused, report, fold, output_path: Path, unfused_path, external: bool,
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


def _refuse_quantized(model: onnx.ModelProto, path: Path) -> None:
    found = quantized_op_types({n.op_type for n in model.graph.node})
    if not found:
        return
    qdq = found <= {"QuantizeLinear", "DequantizeLinear"}
    raise QwtError(f"{path.name} is already quantized ({', '.join(sorted(found))})",
                   notes=["compile takes a float model" + ("; this one is in QDQ form" if qdq else
                                                            "; this one is in QOperator form, which cannot be upgraded")],
                   fix=("add --float-model FLOAT.onnx (the float original) to fit and fold CWAC on its own "
                        "quantization grid (upgrade mode), or pass the float model instead") if qdq else
                       "pass the float model instead")
