"""qwt2-onnx: compile a float ONNX model into a deployable int8 QDQ model.

The public names are imported on first use (PEP 562), so that ``import qwt2_onnx.entry`` — what the
command line starts with — installs its signal handlers before numpy, onnx or onnxruntime load.
"""
from __future__ import annotations

import importlib

_PUBLIC = {"CalibConfig": "config", "CompileConfig": "config", "QuantConfig": "config", "QwtError": "errors",
           "StageError": "errors", "CompileResult": "pipeline", "compile_model": "pipeline",
           "export": "torch_export"}  # export imports torch only when called (extra [torch])

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
