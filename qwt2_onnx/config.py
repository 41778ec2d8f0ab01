"""Typed, frozen configuration for ``compile_model``.

The CLI only parses flags into these dataclasses; the library reads nothing else.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

MAX_SAMPLE_BYTES = 2**30  # what one calibration sample may allocate, all inputs together (1 GiB)

Target = Literal["ort", "trt"]
ActType = Literal["u8", "s8"]
Method = Literal["minmax", "percentile", "entropy"]
CwacTarget = Literal["auto", "global", "local"]
HeadFit = Literal["spread", "lsq"]

QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What the Q/DQ inserter produces.

    ``avx2_safe_weights``: on x86 without VNNI, onnxruntime's u8*s8 kernels add
    pairs of products in int16 and saturate (255*127*2 > 32767).  Restricting
    8-bit weights to the 7-bit range [-63, 63] keeps every pair sum in range
    (255*63*2 = 32130), so deployed results equal the float simulation.
    On by default for ``--target ort`` with 8-bit weights and u8 activations.
    """

    target: Target = "ort"
    wbits: int = 8
    abits: int = 8
    act_type: ActType | None = None  # None: u8 for ort, s8 for trt
    avx2_safe_weights: bool = True
    exclude_names: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from .errors import QwtError

        if self.wbits not in (4, 6, 8):
            raise QwtError(f"unsupported weight bit width {self.wbits}", fix="use --wbits 8, 6 or 4")
        if self.abits not in (6, 8):  # 4-bit activations: onnxruntime cannot fetch or run them as integers
            raise QwtError(f"unsupported activation bit width {self.abits}",
                           notes=["4-bit activations (uint4/int4 QuantizeLinear) have no integer kernel in "
                                  "onnxruntime and cannot be fetched from it, so they could be neither checked "
                                  "nor deployed"],
                           fix="use --abits 8 (or 6, simulated in an 8-bit container); --wbits 4 gives 4-bit weights")
        if self.target not in ("ort", "trt"):
            raise QwtError(f"unknown target '{self.target}'", fix="use --target ort or --target trt")
        for pattern in self.exclude_names:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise QwtError(f"--exclude {pattern!r} is not a valid regular expression: {e}",
                                   fix="fix the expression after 're:' (or use a glob such as 'head*')") from None
        if self.act_type is None:
            object.__setattr__(self, "act_type", "s8" if self.target == "trt" else "u8")
        if self.target == "trt" and self.act_type != "s8":
            raise QwtError(
                "--target trt needs symmetric int8 activations",
                notes=[f"--act-type is {self.act_type}"],
                fix="use --act-type s8 (or leave it unset) with --target trt",
            )

    @property
    def weight_qmax(self) -> int:
        """Largest integer weight magnitude (narrow symmetric range)."""
        if self.wbits == 8 and self.target == "ort" and self.act_type == "u8" and self.avx2_safe_weights:
            return 63
        return 2 ** (self.wbits - 1) - 1

    @property
    def min_opset(self) -> int:
        return 21 if self.wbits == 4 else 13


def _require(ok: bool, what: str, value, fix: str) -> None:
    """An option's value checked where it is built (CLI and Python API alike): exit 2 naming it."""
    if not ok:
        from .errors import QwtError

        raise QwtError(f"{what} {value!r} is out of range", fix=fix)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    method: Method = "percentile"
    percentile: float = 99.99
    batch_size: int = 8  # a memory knob: results do not depend on it (statistics accumulate per sample)
    max_samples: int | None = None
    # .npz of '<weight>:input_range' / '<weight>:output_range' [lo, hi] pairs that replace calibrated ranges
    # (--act-ranges; e.g. from a calibrated PyTorch model, see range_overrides.py)
    range_overrides: str | None = None

    def __post_init__(self) -> None:
        _require(self.method in ("minmax", "percentile", "entropy"), "--calib-method", self.method,
                 "use minmax, percentile or entropy")
        _require(_finite(self.percentile) and 50 < self.percentile <= 100, "--percentile", self.percentile,
                 "pass a percentile in (50, 100], e.g. 99.99: the range keeps that share of each tensor's values")
        _require(_count(self.batch_size), "--batch-size", self.batch_size, "pass a whole number of samples >= 1")
        _require(self.max_samples is None or _count(self.max_samples), "--max-samples", self.max_samples,
                 "pass a whole number of samples >= 1")


@dataclasses.dataclass(frozen=True)
class CwacConfig:
    """QwT-v2 channel-wise affine compensation (see ``cwac.fit``).

    ``target``: ``global`` (the float model's tensor), ``local`` (the float
    layer on the quantized model's input) or ``auto`` (fit both, keep the one
    with the lower held-out output error).  ``lam`` shrinks gains toward 1;
    ``max_gain`` bounds |g| (channels beyond it are left alone);
    ``holdout_fraction`` of the calibration samples judge every fit.
    ``head_fit``: ``spread`` fits score heads (the logits of a Sigmoid
    at a graph output) to keep the float logits' mean and variance, ``lsq`` by
    least squares like every other layer (see ``cwac``).
    ``params``: fold these instead of fitting (``--cwac-params``).
    ``position_mask``: the name of a [batch, seq] graph input (an attention
    mask: nonzero = a real token); the fit's statistics and its gates then
    count only real positions of every tensor laid out [batch, seq, ...,
    channels] or [batch·seq, ..., channels] (``cwac.real_positions``), so
    padding does not steer the fit.
    ``cache_mib``: in-memory budget of each of the fit's two stage-boundary caches
    (``segments.TensorCache``); tensors beyond it go to a temporary folder.
    ``protocol``: ``staged`` (the fit; each stage runs its segment) or ``prefix`` (the slow definition it
    must equal, ``cwac.reference``: the whole prefix re-run per stage, global target only; for the
    benchmarks), both judged by the same gates.
    """

    enabled: bool = True
    target: CwacTarget = "auto"
    lam: float = 0.0
    max_gain: float = 4.0
    holdout_fraction: float = 0.25
    head_fit: HeadFit = "spread"
    params: str | None = None  # .npz of compensation fitted elsewhere ('<weight>:gain', '<weight>:bias')
    position_mask: str | None = None
    cache_mib: int = 64
    protocol: str = "staged"

    def __post_init__(self) -> None:
        from .errors import QwtError

        if self.protocol not in ("staged", "prefix") or (self.protocol == "prefix" and self.target != "global"):
            raise QwtError(f"CWAC protocol '{self.protocol}' with target '{self.target}' is not available",
                           fix="use protocol 'staged', or 'prefix' with target 'global'")
        if self.target not in ("auto", "global", "local"):
            raise QwtError(f"unknown CWAC target '{self.target}'", fix="use --cwac-target auto, global or local")
        if self.head_fit not in ("spread", "lsq"):
            raise QwtError(f"unknown CWAC head fit '{self.head_fit}'", fix="use --cwac-head-fit spread or lsq")
        _require(_finite(self.lam) and self.lam >= 0, "--cwac-lambda", self.lam,
                 "pass a finite shrinkage >= 0 (0: plain least squares)")
        _require(_finite(self.max_gain) and self.max_gain > 0, "CWAC max_gain", self.max_gain,
                 "pass a finite bound > 0 on |gain|")
        if self.cache_mib < 0:
            raise QwtError(f"CWAC cache budget {self.cache_mib} MiB is negative",
                           fix="pass 0 (every cached tensor on disk) or a positive number of MiB")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise QwtError(f"CWAC held-out fraction {self.holdout_fraction} is not in (0, 1)",
                           fix="pass a fraction such as 0.25")


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)
    cwac: CwacConfig = dataclasses.field(default_factory=CwacConfig)
    simplify: bool = True
    check: bool = True  # fused vs unfused check + float/plain/CWAC comparison, report beside the model
    holdout_samples: int = 16  # calibration samples kept aside for the checks and the fidelity summary
    # (0: none kept aside; the checks then run on the first 16 calibration samples, pipeline.split_holdout)
    # write the model with external data above this serialized size (None: protobuf's 2 GB limit); a model
    # read with external data is always written with external data
    external_data_above: int | None = None
    # the CWAC fit over shards of the calibration samples on a Ray cluster (``ray_shards``; the [ray] extra):
    # its address, and how many shard workers (one CPU each)
    ray_address: str | None = None
    ray_workers: int = 2

    def __post_init__(self) -> None:
        _require(isinstance(self.ray_workers, int) and self.ray_workers >= 1, "--ray-workers", self.ray_workers,
                 "pass a whole number of workers >= 1")
        _require(self.external_data_above is None or (isinstance(self.external_data_above, int)
                                                      and self.external_data_above >= 0),
                 "--external-data-above", self.external_data_above, "pass a size in bytes >= 0")
        _require(isinstance(self.holdout_samples, int) and self.holdout_samples >= 0, "holdout_samples",
                 self.holdout_samples, "pass a whole number of samples >= 0")
