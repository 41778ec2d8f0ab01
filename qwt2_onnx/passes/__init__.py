"""Graph passes.  Each is a small class configured in ``__init__`` whose
``__call__`` does the work and returns a :class:`PassResult`."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class PassResult:
    graph: Any  # gs.Graph, or onnx.ModelProto for the passes that run before import
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
