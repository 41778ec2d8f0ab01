"""What the CWAC fit produces and what the gate measured: typed records, a leaf module (no imports from the
package) that the fit, the gate, the fold passes, the report and the CLI all read.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Compensation:
    """A fitted per-channel affine map ``y' = gain ⊙ y + bias`` on ``axis``."""

    layer: str
    gain: np.ndarray
    bias: np.ndarray
    axis: int
    target: str
    stats: dict


@dataclasses.dataclass(frozen=True)
class LayerFit:
    """One layer's fit and the per-layer gate's verdict on it.  ``mse_before`` / ``mse_after``: the layer's
    own error vs its target on the held-out samples, without / with the map (for a score head, its scores'
    error).  ``compensation`` is the map when ``kept``."""

    layer: str
    stage: int
    kept: bool
    mse_before: float
    mse_after: float
    fit: str  # "least squares" | "keep spread"
    zero_variance: int = 0  # channels with no variance: g = 1, β = mean(f − q)
    rejected_channels: int = 0  # channels whose gain was not finite or too large: left alone
    real_positions_only: bool = False  # statistics counted the position mask's real positions only
    compensation: Compensation | None = None

    @property
    def status(self) -> str:
        return "compensated" if self.kept else "rejected: no held-out improvement"


@dataclasses.dataclass(frozen=True)
class OutputError:
    """The output gate's score of one model on ``data``: ``total`` (what the gate ranks by) and each
    sample's share of it, ``per_sample`` (they sum to ``total``; None where an output has no per-sample
    leading axis)."""

    total: float
    per_sample: np.ndarray | None
    decisions: float | None = None  # share of Softmax positions whose argmax is float's (None: no Softmax)


@dataclasses.dataclass(frozen=True)
class HeldOutSamples:
    """How each candidate did sample by sample against no compensation (``CwacFit.held_out_samples``)."""

    n: int
    worse_than_none: dict[str, int]  # candidate -> held-out samples whose output error it raised
    added_error: dict[str, float | None]  # candidate -> those rises' sum / no compensation's whole error

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GateRecord:
    """The output gate's choice, as the report carries it (``cwac_gate`` in docs/REPORT.md)."""

    target: str  # the candidate kept
    output_error: dict[str, float]  # candidate -> held-out output error
    held_out_samples: HeldOutSamples | None
    decision_agreement: dict[str, float] | None  # candidate -> share of Softmax argmax equal to float's
    vetoed: list[str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One layer of the chosen fit, as the report carries it (``cwac_layers`` in docs/REPORT.md)."""

    layer: str
    stage: int
    status: str
    fold: str  # how it was folded ("–": not folded)
    gain_min: float | None
    gain_max: float | None
    negative_gains: int
    heldout_mse_before: float
    heldout_mse_after: float
    fit: str
    positions: str  # "real" (position mask) or "all"
    zero_variance_channels: int
    rejected_channels: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CwacFit:
    """What the fit chose: ``compensations`` (empty when none pays) and why."""

    compensations: dict[str, Compensation]
    target: str  # the chosen candidate: "global", "local", "none" or "params" (--cwac-params)
    layers: list[LayerFit]  # of the chosen candidate
    output_error: dict[str, float]  # candidate -> held-out output error (lower is better)
    stages: int
    seconds: float
    full_range_left_alone: int = 0  # channels left uncompensated: negative gain on an unflippable row
    per_sample: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # candidate -> each held-out
    # sample's share of its output error (absent where an output has no per-sample axis)
    decisions: dict[str, float] = dataclasses.field(default_factory=dict)  # candidate -> share of held-out
    # Softmax positions whose argmax is float's (absent without a Softmax output)
    vetoed: list[str] = dataclasses.field(default_factory=list)  # candidates the decision veto removed
    rejected_by_gate: bool = False  # --cwac-params: the output gate would not have kept them (folded as asked)

    def held_out_samples(self) -> HeldOutSamples | None:
        """How each candidate did sample by sample against no compensation: the held-out samples whose
        output error it raised, and what those rises add up to as a fraction of no compensation's whole
        held-out error (a ratio per sample would make much of a sample plain PTQ got almost exactly right).
        The gate ranks by the sum; this says what the sum hides."""
        base = self.per_sample.get("none")
        if base is None:
            return None
        worse, added = {}, {}
        for target, errs in self.per_sample.items():
            if target == "none":
                continue
            rise = errs - base
            worse[target] = int(np.sum(rise > 0))
            added[target] = round(float(rise[rise > 0].sum() / base.sum()), 4) if base.sum() > 0 else None
        return HeldOutSamples(int(base.size), worse, added)

    @property
    def real_positions_layers(self) -> int:
        """Layers whose statistics counted real positions only (``--cwac-position-mask``)."""
        return sum(f.real_positions_only for f in self.layers)

    @property
    def score_heads(self) -> int:
        """Layers fitted to keep their target's spread (score heads)."""
        return sum(f.fit == "keep spread" for f in self.layers)

    def gate_record(self) -> GateRecord:
        """The output gate's choice for the report: the target kept, each candidate's held-out output error
        and the per-sample account (:meth:`held_out_samples`)."""
        return GateRecord(self.target, {k: round(v, 8) for k, v in self.output_error.items()},
                          self.held_out_samples(), {k: round(v, 6) for k, v in self.decisions.items()} or None,
                          list(self.vetoed))

    def summary(self, n_layers: int) -> dict:
        """The fit in one JSON record (``qwt2-onnx compile --json``, the benchmarks)."""
        return {**self.gate_record().to_dict(), "compensated": len(self.compensations), "layers": n_layers,
                "stages": self.stages, "score_heads_keep_spread": self.score_heads,
                "real_positions_only": self.real_positions_layers,
                "full_range_negative_gain_left_alone": self.full_range_left_alone, "fit_s": round(self.seconds, 2)}

    def layer_rows(self, strategies: dict[str, str]) -> list[LayerRow]:
        """One report record per layer of the chosen fit: stage, status, fold strategy (``strategies``:
        layer -> how it was folded), gain range, held-out error."""
        rows = []
        for f in self.layers:
            comp = self.compensations.get(f.layer)
            rows.append(LayerRow(
                f.layer, f.stage, f.status if self.target != "none" else "not compensated: no held-out output gain",
                strategies.get(f.layer, "–"), float(comp.gain.min()) if comp is not None else None,
                float(comp.gain.max()) if comp is not None else None,
                int((comp.gain < 0).sum()) if comp is not None else 0, f.mse_before, f.mse_after, f.fit,
                "real" if f.real_positions_only else "all", f.zero_variance, f.rejected_channels))
        return rows
