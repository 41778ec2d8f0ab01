"""Reading and writing models: clear errors in, atomic files out.

The input file is only ever read.  The output is written to a temporary file in
the destination directory and renamed into place, so a crash, a full disk or
Ctrl-C never leaves a half-written model.  Models whose serialized size would
exceed protobuf's 2 GB limit are written with external data beside them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .errors import QwtError

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) or raise a QwtError saying why not."""
    p = Path(path)
    if not p.exists():
        raise QwtError(f"model file not found: {p}", fix="pass the path of an existing .onnx file")
    if not p.is_file():
        raise QwtError(f"model path is not a file: {p}", fix="pass the path of an .onnx file, not a directory")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as e:  # protobuf raises DecodeError, RuntimeError or others
        raise QwtError(
            f"cannot read {p} as an ONNX model",
            notes=[f"{type(e).__name__}: {str(e)[:200]}", f"file size: {p.stat().st_size} bytes"],
            fix="check that the file is a complete, uncorrupted .onnx export",
        ) from None
    if not model.graph.node:
        raise QwtError(f"{p} holds no graph nodes: it is not an ONNX model (or it is empty)",
                       fix="pass a model exported to ONNX")
    try:  # a corrupted file can still parse; onnx's checker says what is wrong with it
        onnx.checker.check_model(str(p))
    except Exception as e:  # noqa: BLE001  (ValidationError, or whatever a broken proto makes it raise)
        raise QwtError(f"{p} is not a valid ONNX model",
                       notes=[f"{type(e).__name__}: {str(e).strip()[:300]}"],
                       fix="re-export the model; check it with onnx.checker.check_model") from None
    _check_initializers(model, p)
    return model


def _check_initializers(model: onnx.ModelProto, path: Path) -> None:
    """What onnx's checker lets through in a corrupted file: unknown element types, raw data of the wrong size."""
    known = set(onnx.TensorProto.DataType.values())
    for t in model.graph.initializer:
        problem = None
        if t.data_type not in known or t.data_type == onnx.TensorProto.UNDEFINED:
            problem = f"unknown element type {t.data_type}"
        elif t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL:
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            except Exception:  # noqa: BLE001  (types numpy has no dtype for: leave them to onnxruntime)
                continue
            count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
            bits = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
            expected = (count + 1) // 2 if t.data_type in bits else count * itemsize
            if len(t.raw_data) != expected:
                problem = f"{len(t.raw_data)} bytes of data for shape {list(t.dims)} (expected {expected})"
        if problem:
            raise QwtError(f"{path} is not a valid ONNX model: initializer '{t.name}' has {problem}",
                           fix="re-export the model; the file may be corrupted or truncated")


def _needs_external_data(model: onnx.ModelProto, threshold: int) -> bool:
    return model.ByteSize() > threshold


def check_output_dir(path: str | os.PathLike) -> Path:
    """The directory ``path`` will be written in, or a QwtError if it is missing or read-only."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise QwtError(f"output directory does not exist: {parent}", fix="create it or pass another -o path")
    if not os.access(parent, os.W_OK):
        raise QwtError(f"output directory is not writable: {parent}", fix="pass an -o path in a writable directory")
    return parent


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike, *,
                      external_threshold: int = PROTOBUF_LIMIT) -> Path:
    """Write ``model`` to ``path`` atomically; external data if it is too big."""
    out = Path(path)
    parent = check_output_dir(out)
    external = _needs_external_data(model, external_threshold)
    data_name = out.name + ".data"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_data = parent / f".{data_name}.tmp"
    try:
        if external:
            logger.info("model is %.1f GB: writing weights as external data %s", model.ByteSize() / 1e9, data_name)
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # save_model(external) rewrites tensors in place
            model = copy
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            _retarget_external(tmp, data_name)
            os.replace(tmp_data, parent / data_name)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
        os.replace(tmp, out)
    except OSError as e:
        raise QwtError(f"could not write {out}: {e.strerror or e}",
                       notes=[f"errno {e.errno}"], fix="free disk space or choose another -o path") from None
    finally:
        for leftover in (Path(tmp), tmp_data):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return out


def save_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a small text file (a report) atomically: temp file in the destination directory, then rename."""
    out = Path(path)
    check_output_dir(out)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    except OSError as e:
        raise QwtError(f"could not write {out}: {e.strerror or e}",
                       fix="check that the directory exists and is writable, or choose another -o path") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(tmp).unlink()
    return out


def _retarget_external(model_file: str, data_name: str) -> None:
    """Point the external-data references of ``model_file`` at ``data_name``."""
    m = onnx.load(model_file, load_external_data=False)
    for init in m.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = data_name
    with open(model_file, "wb") as f:
        f.write(m.SerializeToString(deterministic=True))


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Serialized model for onnxruntime (raises QwtError for > 2 GB models)."""
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise QwtError("model exceeds 2 GB in memory; it can only be run from a file with external data")
    return model.SerializeToString()
