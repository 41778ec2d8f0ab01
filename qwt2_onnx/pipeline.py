"""``compile_model``: the stages of DESIGN.md, top to bottom.

    load ─► normalize ─► simplify ─► fold BN ─► plan ─► calibrate ─► insert Q/DQ
         ─► fit CWAC ─► fold CWAC ─► lint (trt) ─► verify ─► write ─► onnxruntime fusion report

``verify`` is one pass over the evaluation samples (:mod:`verify`): the fused vs unfused fold check that
gates the write, the report's comparisons and the fidelity summary.

Each stage's failure is re-raised as a ``StageError`` naming the stage, and the node where it is known.
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
from .checker import CheckReport, data_summary, fold_comparisons, now
from .config import CompileConfig
from .cwac.fit import check_position_mask, fit_compensations
from .cwac.fold import build_graphs, constrain_full_range
from .cwac.gate import gate_given
from .cwac.params import load_cwac_params
from .cwac.records import CwacFit
from .diffstats import Tolerance
from .cwac.points import layer_stages
from .distributed import ShardProgress, calib_source, check_ray, fit_shards, sharded_ranges
from .compile_outputs import FOLD_OUTPUT_ATOL, FOLD_TOLERANCE, check_paths, write_outputs
from .equivalence import FoldCheck
from .errors import CheckFailed, QwtError, StageError, failed_node
from .fidelity import FidelityReport
from .graph_io import export_model
from .inspect_ort import FusionReport, fusion_report
from .model_io import read_model
from .passes.declared_types import repair_from_run
from .passes.fold_batchnorm import FoldBatchNormPass
from .passes.fold_constant_quantizers import FoldConstantQuantizersPass
from .passes.insert_qdq import InsertQDQPass
from .passes.normalize import NormalizePass
from .passes.simplify import SimplifyPass
from .passes.trt_lint import TrtLintPass
from .policy import QuantPlan, coarse_weight_grids, plan_from_qdq, plan_quantization, quantized_op_types
from .runtime import try_run
from .stages import Calibrate, Fold, FoldBN, InsertQDQ, Load, Normalize, Plan, Simplify, Stages, record
from .verify import Verification, verify_compile

logger = logging.getLogger(__name__)

MIN_CWAC_SAMPLES = 4  # fewer cannot be split into a fit part and a held-out part (cwac.gate.Parts)


@dataclasses.dataclass(frozen=True)
class CompileResult:
    output_path: Path
    model: onnx.ModelProto
    float_model: onnx.ModelProto
    plan: QuantPlan
    stages: Stages
    fusion: FusionReport | None
    fidelity: FidelityReport | None
    seconds: dict[str, float]  # stage -> wall seconds, in pipeline order
    cwac: CwacFit | None = None
    plain_model: onnx.ModelProto | None = None  # the plain QDQ model (before CWAC)
    report: CheckReport | None = None
    fold_check: FoldCheck | None = None  # fused vs unfused (None when nothing was folded)


class StageClock:
    """Runs the stages: times each into ``seconds``, re-raises a stage's ``QwtError`` as a ``StageError``
    naming it, and tells ``on_stage`` (a caller's hook: per-stage memory, progress) the stage's name when it
    starts and None when it ends."""

    def __init__(self, on_stage: Callable[[str | None], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.on_stage = on_stage

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.on_stage is not None:
            self.on_stage(name)
        try:
            yield
        except (StageError, CheckFailed, MemoryError, OSError):  # the CLI says what each of these means
            raise
        except QwtError as e:
            raise StageError(name, e, e.node) from None
        except Exception as e:  # our bug, but say where it happened; keep the traceback
            node = failed_node(str(e))
            where = f" on node '{node}'" if node else ""
            raise RuntimeError(f"stage '{name}' failed{where}: {type(e).__name__}: {e}") from e
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
            if self.on_stage is not None:
                self.on_stage(None)
        logger.info("stage %-10s %.2fs", name, self.seconds[name])


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
                  measure: bool = True, unfused_path: str | Path | None = None,
                  on_stage: Callable[[str | None], None] | None = None) -> CompileResult:
    """Compile a float ONNX model into a deployable QDQ model (see module doc).

    ``unfused_path``: also write the unfused graph (explicit CWAC Mul/Add ops).  ``on_stage``: called with
    each stage's name as it starts and None as it ends (``StageClock``)."""
    qcfg, stage, rec = config.quant, StageClock(on_stage), {}
    model_path, output_path = Path(model_path), Path(output_path)
    check_paths(config, output_path, unfused_path, [(model_path, "input model")], calib)
    check_ray(config, calib)
    with stage("load"):
        repairs: list[str] = []
        model, external = read_model(model_path, repairs)  # big models keep their weights beside the graph, out as in
        _refuse_quantized(model, model_path)
        specs = InputSpec.from_model(model)
        data = calib if isinstance(calib, CalibrationSet) else open_calibration(calib, specs, image_preprocess)
        data.validate()  # every sample: names, shapes, dtypes, NaN/Inf, before any heavy work
        check_position_mask(config.cwac, specs, data)
        _read_parameter_files(config)
        repairs += repair_from_run(model, try_run(model, next(iter(data))))  # what inference could not see, a run shows
        rec["load"] = Load(repairs, data.warnings())
    with stage("normalize"):
        result = NormalizePass(qcfg.min_opset)(model)
        del model  # each stage's input is dropped once used: big models are held in memory a few times only
        rec["normalize"] = record(Normalize, result.stats)
    with stage("simplify"):
        result = SimplifyPass(config.simplify)(result.graph)
        rec["simplify"] = record(Simplify, result.stats)
        graph = gs.import_onnx(result.graph)
        del result
    with stage("fold_bn"):
        rec["fold_bn"] = record(FoldBN, FoldBatchNormPass()(graph).stats)
        float_model = export_model(graph)
    with stage("plan"):
        plan = plan_quantization(graph, qcfg)
        rec["plan"] = Plan(len(plan.layers), dict(plan.skipped), plan.unmatched_patterns, dict(plan.left_float))
        if not plan.layers:
            raise QwtError("the model has no layer that can be quantized",
                           notes=[f"{name}: {why}" for name, why in list(plan.skipped.items())[:10]]
                           or ["no Conv, ConvTranspose, Gemm or MatMul with a constant weight"],
                           fix="check the exclusions (--exclude, --exclude-op); a model without such layers gains nothing")
    calib_part, eval_part, held_out = split_holdout(data, config.holdout_samples)
    shard_progress = ShardProgress(progress, config, max(layer_stages(float_model, [lp.node for lp in plan.layers])
                                                         .values(), default=0)) if config.ray_address else None
    with stage("calibrate"):
        overrides = _range_overrides(config, plan)
        ranges = sharded_ranges(float_model, [t for t in plan.activation_tensors if t not in overrides], calib_part,
                         config, progress, calib_source(calib), shard_progress, image_preprocess)
        ranges.update(overrides)
        rec["calibrate"] = Calibrate(len(overrides))
    with stage("insert_qdq"):
        rec["insert_qdq"] = record(InsertQDQ, InsertQDQPass(plan, ranges, qcfg)(graph).stats)
        plain = export_model(graph)
    return _compensate_and_write(_Plain(float_model, plain, plan, external, calib_source=calib_source(calib),
                                        calib_pre=image_preprocess), calib_part,
                                 eval_part, held_out, config, _Outputs(output_path, unfused_path, measure, shard_progress),
                                 stage, rec)


def upgrade_model(qdq_path: str | Path, float_path: str | Path, calib, output_path: str | Path,
                  config: CompileConfig = CompileConfig(), *, image_preprocess=None, measure: bool = True,
                  unfused_path: str | Path | None = None,
                  on_stage: Callable[[str | None], None] | None = None) -> CompileResult:
    """Upgrade mode: fit and fold CWAC on a model another tool already quantized to QDQ (e.g. onnxruntime's
    ``quantize_static``), on that model's own quantization grid, against its float original.  Nothing but
    the compensated layers' weight scales, weight signs and biases changes."""
    stage, rec = StageClock(on_stage), {}
    qdq_path, float_path, output_path = Path(qdq_path), Path(float_path), Path(output_path)
    check_paths(config, output_path, unfused_path, [(qdq_path, "input model"), (float_path, "float model")], calib)
    check_ray(config, calib)
    if config.calib.range_overrides is not None:
        raise QwtError("activation range overrides have no effect in upgrade mode",
                       notes=["the QDQ model's own activation quantizers are kept as they are"],
                       fix="drop --act-ranges, or compile the float model instead")
    with stage("load"):
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
        rec["load"] = Load([], data.warnings())
    with stage("normalize"):
        float_model, plain, stats = normalize_upgrade_inputs(qmodel, fmodel)
        rec["normalize"] = record(Normalize, stats)
    with stage("plan"):
        plan, coarse = plan_upgrade(plain, float_model)
        rec["plan"] = Plan(len(plan.layers), dict(plan.skipped), [], coarse_weight_grids=coarse)
        if not plan.layers:
            raise QwtError("no quantized layer of the QDQ model has a float counterpart to fit against",
                           notes=[f"{name}: {why}" for name, why in list(plan.skipped.items())[:10]],
                           fix="pass the float model the QDQ model was quantized from; node names must match")
        # a bias-free layer that onnxruntime runs in float gets a float bias, not one more DQ op in the graph
        float_layers = frozenset(fusion_report(plain, plan.integer_weights(plain)).float_) \
            if config.quant.target == "ort" and config.cwac.enabled else frozenset()
    calib_part, eval_part, held_out = split_holdout(data, config.holdout_samples)
    return _compensate_and_write(_Plain(float_model, plain, plan, external, float_layers, calib_source(calib),
                                        image_preprocess), calib_part,
                                 eval_part, held_out, config, _Outputs(output_path, unfused_path, measure), stage, rec)


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


@dataclasses.dataclass(frozen=True)
class _Plain:
    """The plain QDQ model and what the CWAC stages need beside it.  ``float_bias``: the layers onnxruntime
    runs in float (upgrade mode; see ``FoldCompensationPass``); ``external``: the input had external data."""

    float_model: onnx.ModelProto
    model: onnx.ModelProto
    plan: QuantPlan
    external: bool
    float_bias: frozenset[str] = frozenset()
    calib_source: str | None = None  # the calibration data's path (what shard workers read)
    calib_pre: object = None  # an image folder's preprocessing (calib_data.ImagePreprocess)


@dataclasses.dataclass(frozen=True)
class _Outputs:
    path: Path
    unfused_path: str | Path | None
    measure: bool  # the fidelity summary and the fusion report
    shard_progress: ShardProgress | None = None  # --ray: one count over every shard call


def _compensate_and_write(p: _Plain, calib_part: CalibrationSet, eval_part: CalibrationSet, held_out: bool,
                          config: CompileConfig, out: _Outputs, stage: StageClock, rec: dict) -> CompileResult:
    """fit CWAC ─► fold ─► lint ─► verify (fold check, report, fidelity) ─► write ─► fusion report."""
    cwac, unfused, fused, fold_check = None, p.model, p.model, None
    fit_samples = calib_part.length if calib_part.length is not None else sum(1 for _ in calib_part)
    if config.cwac.enabled and config.cwac.params is None and fit_samples < MIN_CWAC_SAMPLES:
        rec["load"] = dataclasses.replace(rec["load"], warnings=[*rec["load"].warnings, (
            f"CWAC not fitted: {fit_samples} calibration samples cannot be split into a fit part and a held-out "
            f"part that judges it (at least {MIN_CWAC_SAMPLES} are needed); this is the plain PTQ model")])
        config = dataclasses.replace(config, cwac=dataclasses.replace(config.cwac, enabled=False))
    if config.cwac.enabled:
        with stage("cwac_fit"):
            cwac = _fit(p.float_model, p.model, p.plan, calib_part, config, p.calib_source, out.shard_progress,
                        p.calib_pre)
        with stage("fold"):
            unfused, fused, rec["fold"] = build_graphs(p.model, cwac.compensations,
                                                       int32_bias=config.quant.target == "ort", float_bias=p.float_bias)
    with stage("lint"):
        qmodel = _lint_and_export(gs.import_onnx(fused), config.quant)
    report = checks = None
    if fused is not p.model or config.check or out.measure:
        with stage("verify"):  # the fold check, the report's comparisons, the fidelity summary: one pass
            checks = verify_compile(p.float_model, p.model, qmodel, unfused if fused is not p.model else None,
                                    eval_part, report=config.check, fidelity=out.measure, held_out=held_out)
            fold_check = checks.fold
            if config.check:
                report = _compile_report(checks, cwac, rec.get("fold", Fold()), eval_part, config)
    with stage("write"):
        write_outputs(qmodel, unfused if out.unfused_path else None, report, fold_check, out.path, out.unfused_path,
                      p.external, config.external_data_above)
    fusion = None
    if out.measure:
        with stage("inspect"):
            fusion = fusion_report(qmodel, p.plan.integer_weights(qmodel))
    return CompileResult(out.path, qmodel, p.float_model, p.plan, Stages(**rec), fusion,
                         checks.fidelity if checks is not None else None, stage.seconds, cwac, p.model, report,
                         fold_check)


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


def _fit(float_model, plain, plan, calib_part: CalibrationSet, config: CompileConfig, source: str | None,
         shard_progress: ShardProgress | None = None, pre=None) -> CwacFit:
    if config.cwac.params is not None:  # fitted elsewhere: the same output gate as a fitted compensation
        cwac = gate_given(float_model, plain, load_cwac_params(config.cwac.params, plan, plain), calib_part,
                          config.cwac, config.calib.batch_size)
    else:
        cwac = fit_compensations(float_model, plain, plan, calib_part, config.cwac, config.calib.batch_size,
                                 shards=fit_shards(config, source, calib_part, shard_progress, pre))
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


def _compile_report(checks: Verification, cwac: CwacFit | None, fold: Fold, data: CalibrationSet,
                    config: CompileConfig) -> CheckReport:
    """Comparisons 1-3 of DESIGN.md §5 on the evaluation samples, plus the per-layer CWAC records."""
    tol = Tolerance(rtol=FOLD_TOLERANCE)
    comparisons = []
    if checks.fold is not None:
        comparisons += fold_comparisons(checks.fold, tol, ("unfused", "fused"),
                                        Tolerance(atol=FOLD_OUTPUT_ATOL, rtol=FOLD_TOLERANCE))
    comparisons += [c for c in (checks.deployed, checks.plain_vs_float, checks.cwac_vs_float) if c is not None]
    layers = cwac.layer_rows(fold.strategies) if cwac is not None else []
    return CheckReport("compile", {"output": "the compiled model"}, data_summary(data, config.calib.batch_size),
                       comparisons, now(), layers, cwac.gate_record() if cwac is not None else None)


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
