"""SimplifyPass: run onnxsim when it helps, skip it (with a note) when it fails.

onnxsim folds constants and removes dead or identity nodes.  Surviving nodes
keep their names (NormalizePass named them all first), so layer matching by
name still works afterwards.  The simplified model is only accepted if it
still has the same graph inputs and outputs; otherwise the original is kept.
"""
from __future__ import annotations

import logging
import sys

import onnx

from . import PassResult

logger = logging.getLogger(__name__)


def _io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def _import_onnxsim():
    """``import onnxsim``, without the torch import its package runs for an optional PPQ bridge (which
    then fails on PPQ itself: ``onnxsim.ppq_integration``): 1.2 s of every compile here.  Where torch is
    already imported, or onnxsim is, nothing is hidden."""
    if "onnxsim" in sys.modules or "torch" in sys.modules:
        import onnxsim

        return onnxsim
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError meanwhile
    try:
        import onnxsim
    finally:
        del sys.modules["torch"]
    return onnxsim


class SimplifyPass:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        if not self.enabled:
            return PassResult(model, False, {"onnxsim": "disabled"})
        from ..proto import PROTOBUF_LIMIT, serialized_size

        if serialized_size(model) > PROTOBUF_LIMIT:  # onnxsim round-trips it through files, copying the weights
            logger.info("onnxsim skipped: model over 2 GB")
            return PassResult(model, False, {"onnxsim": "skipped: model over 2 GB (it would copy every weight "
                                                        "several times); constants are folded by onnxruntime"})
        try:
            onnxsim = _import_onnxsim()
            simplified, ok = onnxsim.simplify(model, check_n=0, skip_fuse_bn=True)
        except Exception as e:  # onnxsim fails on some real models: that is not fatal
            note = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            logger.info("onnxsim %s", note)
            return PassResult(model, False, {"onnxsim": note})
        if not ok or _io_names(simplified) != _io_names(model):
            logger.info("onnxsim result rejected (check failed or interface changed)")
            return PassResult(model, False, {"onnxsim": "skipped: result changed the model interface"})
        before, after = len(model.graph.node), len(simplified.graph.node)
        logger.info("onnxsim: %d -> %d nodes", before, after)
        return PassResult(simplified, after != before, {"onnxsim": f"{before} -> {after} nodes"})
