"""Nothing lost: every path a run writes, checked against every path it reads, before any work.

A compile reads the model and its external-data files, ``--float-model`` and
its data, the calibration file or folder, ``--cwac-params`` and
``--act-ranges``; it writes the model, possibly ``OUT.data``, possibly the
unfused model and its ``.data``, and the two reports.  Before anything heavy
starts, :func:`check_run_paths` refuses (``QwtError``, exit 2):

* a write that is a read, by resolved path (symlinks followed) *or* by inode
  (hard links), so no output can ever replace an input;
* two writes that are the same file (``--emit-unfused`` equal to ``-o``);
* a destination that is not a regular file (a directory, a FIFO, a device
  node, a socket), or one written as a folder (``-o newdir/``);
* a destination whose folder is missing or not writable, or an existing
  destination that cannot be replaced (read-only, immutable): probed, not
  guessed, so running as root gives the same answers as the write would.

The write itself is all-or-nothing (``model_io.AtomicOutputs``).
"""
from __future__ import annotations

import dataclasses
import os
import stat
import tempfile
from pathlib import Path

import onnx

from .errors import QwtError


@dataclasses.dataclass(frozen=True)
class Access:
    """One path a run touches, and what it is to the user (named in every message)."""

    path: Path
    role: str


def model_files(path: str | os.PathLike, role: str) -> list[Access]:
    """A model file and the external-data files it names (read from the graph, weights not loaded)."""
    p = Path(path)
    found = [Access(p, role)]
    if not p.is_file():
        return found
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001  (an unreadable model is reported by the load stage)
        return found
    locations = {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    return found + [Access(p.parent / loc, f"external data of {role}") for loc in sorted(locations)]


def data_files(source, role: str) -> list[Access]:
    """A calibration source's files: the file, or the folder and every file in it that the folder reader
    reads (``.npy``, ``.npz``, images; none for Python data)."""
    from .calib_data import IMAGE_SUFFIXES

    if not isinstance(source, (str, os.PathLike)):
        return []
    p = Path(source)
    found = [Access(p, role)]
    if p.is_dir():
        found += [Access(f, f"{role} file") for f in sorted(p.iterdir())
                  if f.suffix.lower() in IMAGE_SUFFIXES | {".npy", ".npz"}]
    return found


def _same(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        sa, sb = a.stat(), b.stat()
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    except OSError:  # one of them does not exist (yet): no inode to share
        return False


def check_run_paths(reads: list[Access], writes: list[Access]) -> None:
    """Refuse a run that would overwrite an input, write one file twice, or fail at its write stage."""
    for i, w in enumerate(writes):
        try:
            _check_destination(w)
        except OSError as e:  # what inspecting the path itself raised (a name too long, a loop of links...)
            raise QwtError(f"cannot use {w.path} as the {w.role}: {e.strerror or e}",
                           fix="pass another output path") from None
        for r in reads:
            if _same(w.path, r.path):
                raise QwtError(f"the {w.role} would overwrite the {r.role}: {w.path}",
                               notes=[f"{w.role}: {w.path}", f"{r.role}: {r.path}"],
                               fix="choose another output path (-o / --emit-unfused); inputs are never overwritten")
        for other in writes[:i]:
            if _same(w.path, other.path) or w.path.resolve() == other.path.resolve():
                raise QwtError(f"the {w.role} and the {other.role} are the same file: {w.path}",
                               fix="give each output its own path")


def _check_destination(w: Access) -> None:
    path, parent = w.path, w.path.parent if str(w.path.parent) else Path(".")
    try:
        name_max = os.pathconf(parent if parent.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(path.name.encode()) > name_max:
        raise QwtError(f"the {w.role} name is {len(path.name.encode())} bytes long; this file system allows "
                       f"{name_max}", notes=[f"{w.role}: {path}"], fix="pass a shorter output name")
    if str(path).endswith((os.sep, "/")) or path.is_dir():
        raise QwtError(f"the {w.role} path is a folder: {path}", fix="pass a file path such as out/model.int8.onnx")
    if os.path.lexists(path):
        mode = os.stat(path).st_mode if path.exists() else os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
            raise QwtError(f"the {w.role} path {path} is {kind}",
                           notes=["outputs replace their destination with a regular file"],
                           fix="pass the path of a regular file (existing or new)")
    if not parent.is_dir():
        raise QwtError(f"output directory does not exist: {parent}",
                       notes=[f"{w.role}: {path}"], fix="create it or pass another path")
    try:  # os.access, then a probe: as root os.access says yes to folders on a read-only file system
        if not os.access(parent, os.W_OK):
            raise PermissionError(13, "Permission denied")
        probe = tempfile.mkdtemp(prefix=".qwt2-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise QwtError(f"output directory is not writable: {parent}", notes=[f"{w.role}: {path}", f"{e.strerror}"],
                       fix="pass a path in a writable directory") from None
    if path.exists() and not _replaceable(path):
        raise QwtError(f"the existing {w.role} {path} cannot be replaced (read-only or immutable)",
                       fix="remove it, make it writable, or pass another path")


def _replaceable(path: Path) -> bool:
    """Whether an existing file can be written (opened for append, which changes nothing)."""
    if not os.access(path, os.W_OK):
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    os.close(fd)
    return True
