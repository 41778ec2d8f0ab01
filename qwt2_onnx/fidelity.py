"""Float vs quantized output fidelity, simulated and as deployed (the compile summary's numbers).

*simulated*: onnxruntime with graph optimizations off (every Q/DQ runs as
written, in float).  *deployed*: optimizations on, as users run it (QDQ groups
become integer kernels).  Both are compared to the float model per output;
:mod:`verify` measures them in the same pass as the compile's checks.
"""
from __future__ import annotations

import dataclasses

from .diffstats import DiffStats


@dataclasses.dataclass(frozen=True)
class FidelityReport:
    simulated: dict[str, DiffStats]
    deployed: dict[str, DiffStats]
    samples: int
    held_out: bool
    baseline: dict[str, DiffStats] | None = None  # the plain QDQ model (no CWAC), simulated
