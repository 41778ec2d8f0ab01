"""qwt2-onnx: compile a float ONNX model into a deployable int8 QDQ model."""
from .config import CalibConfig, CompileConfig, QuantConfig
from .errors import QwtError, StageError
from .pipeline import CompileResult, compile_model
from .torch_export import export  # imports torch only when called (extra [torch])

__all__ = ["CalibConfig", "CompileConfig", "CompileResult", "QuantConfig", "QwtError", "StageError", "compile_model", "export"]
__version__ = "0.1.0"
