"""What each compile stage did, as typed records (``CompileResult.stages``): read by the terminal summary, the
benchmarks and the tests as fields.  A pass's counts become its stage's record through :func:`record`,
which refuses a count the record does not name, so a pass and its record cannot drift apart silently.
A leaf module.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

R = TypeVar("R")


def record(cls: type[R], stats: dict[str, Any]) -> R:
    """``cls`` from a pass's stats dict (``PassResult.stats``); a key that is not a field is a TypeError."""
    return cls(**stats)


@dataclasses.dataclass(frozen=True)
class Load:
    repaired_declarations: list[str] = dataclasses.field(default_factory=list)  # model declarations repaired
    warnings: list[str] = dataclasses.field(default_factory=list)  # about the calibration data / the run


@dataclasses.dataclass(frozen=True)
class Normalize:
    """``NormalizePass`` on a float model; in upgrade mode only ``constant_quantizers_folded`` is counted."""

    opset: str = ""  # "13" or "11->13"
    renamed_nodes: int = 0
    constants_to_initializers: int = 0
    initializer_inputs_removed: int = 0
    gemm_biases_broadcast: int = 0
    float32_inside: dict[str, int] = dataclasses.field(default_factory=dict)  # what Float32Pass converted
    shape_inference: str = ""  # "ok" or "skipped: <why>"
    constant_quantizers_folded: int = 0  # upgrade mode: Q(constant) weights folded to integer constants


@dataclasses.dataclass(frozen=True)
class Simplify:
    onnxsim: str = "disabled"  # "<before> -> <after> nodes", "disabled" or "skipped: <why>"


@dataclasses.dataclass(frozen=True)
class FoldBN:
    folded: int = 0
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # BatchNormalization node -> why


@dataclasses.dataclass(frozen=True)
class Plan:
    layers: int
    skipped: dict[str, str]  # node -> why it is not quantized
    unmatched_patterns: list[str]  # --exclude patterns that matched nothing
    left_float: dict[str, str] = dataclasses.field(default_factory=dict)  # other compute ops left in float
    coarse_weight_grids: dict[str, dict] = dataclasses.field(default_factory=dict)  # upgrade mode: per-tensor
    # weight grids a few wide channels set (policy.coarse_weight_grids)


@dataclasses.dataclass(frozen=True)
class Calibrate:
    range_overrides: int = 0  # activation ranges given from outside (--act-ranges)


@dataclasses.dataclass(frozen=True)
class InsertQDQ:
    layers: int = 0
    activation_qdq: int = 0
    weight_scale_raised_for_int32_bias: int = 0  # weight scale channels raised so the int32 bias fits
    zero_bias_added: int = 0
    bias_clipped: int = 0


@dataclasses.dataclass(frozen=True)
class Fold:
    """The CWAC fold (``cwac.fold.build_graphs``): how each compensated layer was folded."""

    strategies: dict[str, str] = dataclasses.field(default_factory=dict)  # layer -> strategy, or "skipped: <why>"
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> layers
    inserted_ops: list[str] = dataclasses.field(default_factory=list)  # ops the fold had to add (none expected)
    int32_bias_overflow: dict[str, int] = dataclasses.field(default_factory=dict)  # layer -> channels left alone


@dataclasses.dataclass(frozen=True)
class Stages:
    """One record per stage, in pipeline order; a stage that did not run keeps its empty record."""

    load: Load = Load()
    normalize: Normalize = Normalize()
    simplify: Simplify = Simplify()
    fold_bn: FoldBN = FoldBN()
    plan: Plan | None = None
    calibrate: Calibrate = Calibrate()
    insert_qdq: InsertQDQ = InsertQDQ()
    fold: Fold = Fold()
