"""Error statistics between a reference and a candidate tensor, streamed."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class ErrorStats:
    """Running sums for SQNR / cosine / max error over many batches."""

    n: int = 0
    sum_ref2: float = 0.0
    sum_cand2: float = 0.0
    sum_err2: float = 0.0
    sum_dot: float = 0.0
    max_abs: float = 0.0

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = np.asarray(ref, np.float64).ravel()
        c = np.asarray(cand, np.float64).ravel()
        e = c - r
        self.n += r.size
        self.sum_ref2 += float(r @ r)
        self.sum_cand2 += float(c @ c)
        self.sum_err2 += float(e @ e)
        self.sum_dot += float(r @ c)
        if e.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(e))))

    @property
    def sqnr_db(self) -> float:
        if self.sum_err2 == 0:
            return float("inf")
        return 10.0 * np.log10(max(self.sum_ref2, 1e-300) / self.sum_err2)

    @property
    def cosine(self) -> float:
        den = np.sqrt(self.sum_ref2 * self.sum_cand2)
        return float(self.sum_dot / den) if den > 0 else (1.0 if self.sum_err2 == 0 else 0.0)

    def as_dict(self) -> dict[str, float]:
        return {"sqnr_db": round(self.sqnr_db, 3), "cosine": round(self.cosine, 6), "max_abs": self.max_abs}
