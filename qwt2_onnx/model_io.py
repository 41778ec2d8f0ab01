"""Reading and writing models: clear errors in, atomic files out.

The input file is only ever read.  Outputs are staged in a hidden folder in the
destination directory and renamed into place together (:class:`AtomicOutputs`),
so a crash, a full disk or Ctrl-C never leaves a half-written model.  Models read
with external data, or whose serialized size would exceed protobuf's 2 GB
limit, are written with external data beside them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from .errors import QwtError
from .proto import PROTOBUF_LIMIT, serialized_size, structure, write_external

logger = logging.getLogger(__name__)

def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) or raise a QwtError saying why not."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike, repairs: list[str] | None = None) -> tuple[onnx.ModelProto, bool]:
    """:func:`load_model`, and whether the file keeps any tensor in external data.  Wrong graph-output
    declarations are repaired (``passes.declared_types``); ``repairs`` collects one line per repair."""
    p = Path(path)
    if not p.exists():
        raise QwtError(f"model file not found: {p}", fix="pass the path of an existing .onnx file")
    if not p.is_file():
        raise QwtError(f"model path is not a file: {p}", fix="pass the path of an .onnx file, not a directory")
    try:
        model = onnx.load(str(p), load_external_data=False)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        if external:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except Exception as e:  # protobuf raises DecodeError, RuntimeError or others
        raise QwtError(
            f"cannot read {p} as an ONNX model",
            notes=[f"{type(e).__name__}: {str(e)[:200]}", f"file size: {p.stat().st_size} bytes"],
            fix="check that the file is a complete, uncorrupted .onnx export",
        ) from None
    if not model.graph.node:
        raise QwtError(f"{p} holds no graph nodes: it is not an ONNX model (or it is empty)",
                       fix="pass a model exported to ONNX")
    from .passes.declared_types import repair_declared_types

    found = repair_declared_types(model)  # wrong graph-output declarations: repaired before anything trusts them
    try:  # a corrupted file can still parse; onnx's checker says what is wrong with it
        onnx.checker.check_model(structure(model))
    except Exception as e:  # noqa: BLE001  (ValidationError, or whatever a broken proto makes it raise)
        raise QwtError(f"{p} is not a valid ONNX model",
                       notes=[f"{type(e).__name__}: {str(e).strip()[:300]}"],
                       fix="re-export the model; check it with onnx.checker.check_model") from None
    _check_initializers(model, p)
    if repairs is not None:
        repairs.extend(found)
    return model, external


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


def check_output_dir(path: str | os.PathLike) -> Path:
    """The directory ``path`` will be written in, or a QwtError if it is missing or read-only."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise QwtError(f"output directory does not exist: {parent}", fix="create it or pass another -o path")
    if not os.access(parent, os.W_OK):
        raise QwtError(f"output directory is not writable: {parent}", fix="pass an -o path in a writable directory")
    return parent


_WRITTEN: list[Path] = []  # every destination this process has committed, for an honest interrupt message


def written_paths() -> list[Path]:
    """The outputs this process has placed (committed) so far."""
    return list(_WRITTEN)


def private_tempdir(prefix: str, dir: str | os.PathLike | None = None) -> Path:
    """A new temporary folder ``<prefix><pid>-<random>`` in ``dir`` (default: TMPDIR).  Folders with the same
    prefix left behind by runs that died without cleaning up (SIGKILL, power loss) — their pid no longer
    running — are removed first."""
    parent = Path(dir) if dir is not None else Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for old in parent.glob(prefix + "*"):
            pid = old.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


class AtomicOutputs:
    """Files written as one: each is staged in a hidden temporary folder beside its destination and
    ``commit()`` renames them all into place; leaving the ``with`` block any other way (an error, a full
    disk, Ctrl-C) removes every staged file, so no half-written or partial set of outputs is ever seen.

    A model is written with external data (``NAME.data`` beside it) when ``external`` is set or its
    serialized size exceeds ``external_above`` bytes (protobuf cannot hold more than 2 GB)."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (staged file, destination)
        self._dirs: dict[Path, Path] = {}  # destination directory -> its staging folder

    def _stage(self, path: str | os.PathLike) -> tuple[Path, Path]:
        out = Path(path)
        parent = check_output_dir(out)
        if parent not in self._dirs:
            self._dirs[parent] = private_tempdir(".qwt2-staging-", parent)
        return self._dirs[parent] / out.name, out

    def model(self, model: onnx.ModelProto, path: str | os.PathLike, *, external: bool = False,
              external_above: int | None = None) -> Path:
        staged, out = self._stage(path)
        limit = PROTOBUF_LIMIT if external_above is None else min(external_above, PROTOBUF_LIMIT)
        external = external or serialized_size(model) > limit
        with self._errors(out):
            if external:
                logger.info("writing %s with its weights as external data %s.data (%.2f GB)", out.name, out.name,
                            serialized_size(model) / 1e9)
                write_external(model, str(staged))
                data = staged.with_name(out.name + ".data")
                if data.exists():  # tensors under 1 KiB stay inline: a small model may have nothing external
                    self._staged.append((data, out.with_name(out.name + ".data")))
            else:
                with open(staged, "wb") as f:
                    f.write(model.SerializeToString(deterministic=True))
        self._staged.append((staged, out))
        return out

    def text(self, text: str, path: str | os.PathLike) -> Path:
        staged, out = self._stage(path)
        with self._errors(out):
            with open(staged, "w") as f:
                f.write(text)
        self._staged.append((staged, out))
        return out

    @staticmethod
    @contextlib.contextmanager
    def _errors(out: Path):
        try:
            yield
        except OSError as e:
            raise QwtError(f"could not write {out}: {e.strerror or e}", notes=[f"errno {e.errno}"],
                           fix="free disk space or choose another -o path; nothing was written") from None

    def commit(self) -> None:
        """Place every staged file, or none: an existing destination is first moved aside into the staging
        folder, and if any rename fails the files already placed are taken back and the old ones restored."""
        placed: list[tuple[Path, Path | None]] = []  # (destination, its previous file moved aside, or None)
        try:
            for k, (staged, out) in enumerate(self._staged):
                backup = None
                if os.path.lexists(out):
                    backup = staged.with_name(f".previous-{k}-{out.name}")
                    os.replace(out, backup)
                placed.append((out, backup))
                os.replace(staged, out)
        except BaseException as e:
            for out, backup in reversed(placed):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, out)
                    elif os.path.lexists(out):
                        os.remove(out)
            if isinstance(e, OSError):
                raise QwtError(f"could not write {out}: {e.strerror or e}", notes=[f"errno {e.errno}"],
                               fix="free disk space or choose another path; nothing was written") from None
            raise
        _WRITTEN.extend(out for _, out in self._staged)
        self._staged.clear()

    def __enter__(self) -> "AtomicOutputs":
        return self

    def __exit__(self, *exc) -> None:
        for d in self._dirs.values():
            shutil.rmtree(d, ignore_errors=True)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike, *, external: bool = False,
                      external_above: int | None = None) -> Path:
    """Write one model atomically (see :class:`AtomicOutputs`)."""
    with AtomicOutputs() as outputs:
        out = outputs.model(model, path, external=external, external_above=external_above)
        outputs.commit()
    return out


def save_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a small text file (a report) atomically."""
    with AtomicOutputs() as outputs:
        out = outputs.text(text, path)
        outputs.commit()
    return out


@contextlib.contextmanager
def runnable(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """What onnxruntime can load ``model`` from: its bytes, or for a model over protobuf's 2 GB limit a file
    with external data in a temporary folder (removed on exit; the session keeps what it loaded)."""
    if serialized_size(model) <= PROTOBUF_LIMIT:
        yield model.SerializeToString()
        return
    folder = private_tempdir("qwt2-large-model-")
    try:
        path = os.path.join(folder, "model.onnx")
        write_external(model, path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)
