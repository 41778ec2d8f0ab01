"""Calibration data: where samples come from, and checks before heavy work.

A *sample* is a feed dict ``{input_name: array}`` whose arrays carry a leading
batch axis of 1.  Sources (``open_calibration``):

* ``.npz`` file: one array per graph input, first axis = samples;
* a folder of ``.npz`` files (each like the above) or ``.npy`` files (single-
  input models only; each file is one sample, or several along axis 0);
* a folder of images with an :class:`ImagePreprocess` (needs Pillow);
* from Python, a list of feed dicts or a zero-argument callable returning an
  iterator of them (so the data can be streamed more than once).

Every sample is checked against the model's inputs: names, rank, dtype, fixed
dimensions, NaN/Inf.  Errors name the input, the sample and the expected vs
actual value.
"""
from __future__ import annotations

import dataclasses
import logging
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from .calib_images import ImagePreprocess, image_samples
from .config import MAX_SAMPLE_BYTES
from .errors import QwtError

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

_ONNX_TO_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
               onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
               onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8,
               onnx.TensorProto.INT8: np.int8, onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.INT16: np.int16,
               onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.UINT32: np.uint32, onnx.TensorProto.UINT64: np.uint64}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # ints are fixed dims; str/None are symbolic

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> list["InputSpec"]:
        inits = {i.name for i in model.graph.initializer}
        specs = []
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
            if tt.elem_type not in _ONNX_TO_NP:
                kind = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type in \
                    onnx.TensorProto.DataType.values() else str(tt.elem_type)
                raise QwtError(f"graph input '{vi.name}' has element type {kind}, which calibration data cannot "
                               "be given in",
                               notes=[f"supported input types: {', '.join(np.dtype(t).name for t in _ONNX_TO_NP.values())}",
                                      "bfloat16/float16/float64 weights and computation inside the model are fine: "
                                      "they are computed in float32"],
                               fix="re-export the model with float32 (or float16) inputs")
            specs.append(cls(vi.name, np.dtype(_ONNX_TO_NP[tt.elem_type]), dims))
        return specs

    def shape_str(self) -> str:
        return "[" + ", ".join(str(d) if d is not None else "?" for d in self.shape) + "]"


class CalibrationSet:
    """A re-iterable, validated stream of samples."""

    def __init__(self, factory: Callable[[], Iterator[Feed]], specs: list[InputSpec], description: str,
                 length: int | None = None):
        self._factory = factory
        self.specs = specs
        self.description = description
        self.length = length

    def __iter__(self) -> Iterator[Feed]:
        count = 0
        for count, feed in enumerate(self._factory(), start=1):
            yield check_sample(feed, self.specs, count - 1, self.description)
        if count == 0:
            raise QwtError(f"calibration data {self.description} holds no samples",
                           fix="pass a non-empty --calib data set")

    def validate(self) -> int:
        """Read every sample once (names, ranks, shapes, dtypes, NaN/Inf) before any heavy work; the count.
        Only the sample being checked is in memory."""
        count, nonzero = 0, set()
        for feed in self:
            count += 1
            nonzero.update(k for k, v in feed.items() if np.any(v))
        self.length = count
        self.all_zero = [s.name for s in self.specs if s.name not in nonzero]
        return count

    def warnings(self) -> list[str]:
        """What is valid but almost certainly wrong about the data (after :meth:`validate`)."""
        floats = [s.name for s in self.specs if np.issubdtype(s.dtype, np.floating)]
        zero = [n for n in floats if n in getattr(self, "all_zero", [])]
        if floats and len(zero) == len(floats):
            return [f"every calibration sample of {', '.join(repr(n) for n in zero)} is all zeros: the ranges "
                    "calibrated on it are meaningless and the compiled model will be too; pass real data"]
        return []

    def take(self, start: int, stop: int | None) -> "CalibrationSet":
        """The samples [start, stop) of this set (a lazy view)."""
        def factory() -> Iterator[Feed]:
            for i, feed in enumerate(self._factory()):
                if stop is not None and i >= stop:
                    return
                if i >= start:
                    yield feed
        n = None if self.length is None else max(0, min(self.length, stop or self.length) - start)
        return CalibrationSet(factory, self.specs, f"{self.description}[{start}:{stop}]", n)


def check_sample(feed: Feed, specs: list[InputSpec], index: int, where: str) -> Feed:
    if not isinstance(feed, dict):
        raise QwtError(f"calibration sample {index} from {where} is a {type(feed).__name__}, not a feed dict",
                       fix="yield dicts mapping each graph input name to an array")
    expected = {s.name for s in specs}
    missing, unknown = expected - set(feed), set(feed) - expected
    if missing or unknown:
        raise QwtError(
            f"calibration data {where} does not match the model inputs",
            notes=[f"model inputs: {sorted(expected)}", f"data arrays: {sorted(feed)}"]
            + ([f"missing: {sorted(missing)}"] if missing else []) + ([f"unknown: {sorted(unknown)}"] if unknown else []),
            fix="name the arrays exactly like the model's graph inputs")
    out = {}
    for spec in specs:
        a = np.asarray(feed[spec.name])
        _check_array(a, spec, index, where)
        out[spec.name] = a
    return out


def _check_array(a: np.ndarray, spec: InputSpec, index: int, where: str, values: bool = True) -> None:
    if a.dtype != spec.dtype:
        raise QwtError(f"calibration input '{spec.name}' has dtype {a.dtype}, the model expects {spec.dtype}",
                       notes=[f"sample {index} of {where}"], fix=f"convert the data with .astype(np.{spec.dtype})")
    if spec.shape and a.ndim != len(spec.shape):
        raise QwtError(f"calibration input '{spec.name}' has rank {a.ndim}, the model expects rank {len(spec.shape)}",
                       notes=[f"sample {index} of {where}: shape {list(a.shape)}", f"model input shape {spec.shape_str()}"],
                       fix="for .npz data the first axis counts samples: each array is [samples, ...model shape without batch]")
    for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
        if isinstance(want, int) and want > 0 and want != got:
            raise QwtError(f"calibration input '{spec.name}' has shape {list(a.shape)}, the model expects {spec.shape_str()}",
                           notes=[f"sample {index} of {where}", f"axis {axis}: expected {want}, got {got}"],
                           fix="resize the calibration data to the model's input shape; for an input whose "
                               "first axis is not a free batch axis (a fixed size, a state [2, batch, 128], a "
                               "scalar), store [samples, *input shape]: one rank more than the input")
    if values and np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise QwtError(f"calibration input '{spec.name}' sample {index} holds {bad} NaN/Inf values",
                       notes=[f"source: {where}"], fix="clean the calibration data (NaN/Inf ranges cannot be quantized)")


@dataclasses.dataclass(frozen=True)
class _Header:
    """An ``.npy`` array's header, read and checked before any of its data is."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    data_bytes: int  # what the file really holds after the header


def _read_npy_header(f, stored_bytes: int, where: str) -> _Header:
    """The header of the ``.npy`` stream ``f`` (``stored_bytes`` long in all), refused when it lies: a
    non-integer or negative dimension, an object dtype (never unpickled), or a declared size the stored
    bytes do not hold (a 6 MB file claiming a 3 GB sample is refused before anything is read)."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f, max_header_size=10000) if "max_header_size" in \
            read.__code__.co_varnames else read(f)
    except (ValueError, OSError, SyntaxError, EOFError) as e:
        raise QwtError(f"cannot read the array header of {where}", notes=[f"{type(e).__name__}: {str(e)[:200]}"],
                       fix="write the data with numpy.save / numpy.savez") from None
    if dtype.hasobject:
        raise QwtError(f"{where} holds Python objects (dtype {dtype}), which are never unpickled",
                       fix="save plain numeric arrays with numpy.save / numpy.savez")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise QwtError(f"{where} declares an invalid shape {shape}", fix="re-save the array with numpy")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    header = f.tell()
    if declared != stored_bytes - header:
        raise QwtError(f"{where} declares shape {list(shape)} of {dtype} ({declared} bytes) but holds "
                       f"{stored_bytes - header} bytes of data", fix="the file is truncated or corrupted: re-save it")
    return _Header(tuple(shape), dtype, fortran, declared)


def sample_shape(array_shape: tuple[int, ...], spec: InputSpec | None) -> tuple[int, ...]:
    """One sample's shape in an array whose first axis counts samples.  An array one rank above the
    model's input holds whole inputs (``[n, *input shape]``: what a scalar input, an input whose batch
    axis is not the first — a recurrent state ``[2, batch, 128]`` — or a batch fixed above 1 needs); an
    array of the input's own rank holds samples along the batch axis (``[n, C, H, W]`` for
    ``[N, C, H, W]``: each sample keeps a batch of 1)."""
    if spec is not None and len(array_shape) == len(spec.shape) + 1:
        return tuple(array_shape[1:])
    return (1,) + tuple(array_shape[1:]) if array_shape else ()


def _check_headers(headers: dict[str, _Header], specs: list[InputSpec], where: str, first_axis_counts: bool) -> None:
    """Each array's header against the model's input specs, before its data is read: dtype, rank, fixed
    dimensions, and how much one sample would allocate (``MAX_SAMPLE_BYTES``)."""
    by_name = {s.name: s for s in specs}
    total = 0
    for key, h in headers.items():
        spec = by_name.get(key)
        one = sample_shape(h.shape, spec) if first_axis_counts else h.shape
        if spec is not None:
            dummy = np.lib.stride_tricks.as_strided(np.zeros(1, h.dtype), shape=one, strides=(0,) * len(one))
            _check_array(dummy, spec, 0, where, values=False)
        total += int(np.prod(one, dtype=object)) * h.dtype.itemsize
    if total > MAX_SAMPLE_BYTES:
        raise QwtError(f"one calibration sample of {where} would take {total / 2**20:.0f} MiB",
                       notes=[f"limit: {MAX_SAMPLE_BYTES / 2**20:.0f} MiB per sample", *(
                           f"'{k}': {list(h.shape)} {h.dtype}" for k, h in headers.items())],
                       fix="check the arrays' shapes: for .npz data the first axis counts samples")


def _regular_file(path: Path, what: str) -> None:
    """Calibration data is read from regular files only: a FIFO or a link to /dev/zero would hang the run."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise QwtError(f"cannot read {what} {path}: {e.strerror}", fix="pass a readable file") from None
    if not stat.S_ISREG(mode):
        raise QwtError(f"{what} {path} is not a regular file (a FIFO, a device or a socket)",
                       fix="pass a regular .npz/.npy file or a folder of them")


def _npz_members(path: Path, specs: list[InputSpec] | None = None) -> dict[str, _Header]:
    """Each array's header in an .npz, checked (``_read_npy_header``, ``_check_headers``), data unread."""
    _regular_file(path, "calibration file")
    try:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    with zf.open(info) as f:
                        out[info.filename[:-4]] = _read_npy_header(f, info.file_size,
                                                                   f"array '{info.filename[:-4]}' in {path}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, NotImplementedError) as e:
        raise QwtError(f"cannot read calibration file {path}", notes=[f"{type(e).__name__}: {e}"],
                       fix="pass an .npz written by numpy.savez") from None
    if specs is not None:
        _check_headers(out, specs, str(path), first_axis_counts=True)
    return out


SMALL_NPZ_BYTES = 256 * 2**20  # --cwac-params / --act-ranges hold O(channels) numbers


def read_small_npz(path: str | Path, what: str, fix: str) -> dict[str, np.ndarray]:
    """A small ``.npz`` of parameters (``--cwac-params``, ``--act-ranges``), read as safely as calibration
    data: a regular file, headers checked, at most ``SMALL_NPZ_BYTES`` in all, nothing unpickled."""
    p = Path(path)
    if not p.exists():
        raise QwtError(f"{what} not found: {p}", fix=fix)
    headers = _npz_members(p)
    total = sum(h.data_bytes for h in headers.values())
    if total > SMALL_NPZ_BYTES:
        raise QwtError(f"{what} {p} declares {total / 2**20:.0f} MiB of arrays", fix=fix)
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001  (numpy's own errors for what the headers did not show)
        raise QwtError(f"cannot read {what} {p}", notes=[f"{type(e).__name__}: {str(e)[:200]}"], fix=fix) from None


def _npz_samples(path: Path, specs: list[InputSpec]) -> Iterator[Feed]:
    """Stream an .npz one sample at a time: memory stays at one sample per input."""
    members = _npz_members(path, specs)
    counts = {k: (h.shape[0] if h.shape else 0) for k, h in members.items()}
    if len(set(counts.values())) > 1:
        raise QwtError(f"arrays in {path} have different sample counts", notes=[f"{counts}"],
                       fix="every array's first axis must count the same samples")
    with zipfile.ZipFile(path) as zf:
        streams = {}
        for key, h in members.items():
            if h.fortran and len(h.shape) > 1:
                raise QwtError(f"array '{key}' in {path} is stored in Fortran order",
                               fix="save plain C-ordered numeric arrays with numpy.savez")
            info = zf.getinfo(key + ".npy")
            f = zf.open(info)
            _read_npy_header(f, info.file_size, f"array '{key}' in {path}")
            streams[key] = (f, sample_shape(h.shape, next((sp for sp in specs if sp.name == key), None)), h.dtype)
        for _ in range(next(iter(counts.values()), 0)):
            feed = {}
            for key, (f, shape, dtype) in streams.items():
                nbytes = int(np.prod(shape)) * dtype.itemsize
                chunk = f.read(nbytes)
                if len(chunk) != nbytes:
                    raise QwtError(f"array '{key}' in {path} ends early", fix="the file is truncated: re-save it")
                feed[key] = np.frombuffer(chunk, dtype=dtype).reshape(shape)
            yield feed


def _npy_array(path: Path, specs: list[InputSpec]) -> np.ndarray:
    """An ``.npy`` file's array, its header checked first (one sample, or several along axis 0)."""
    _regular_file(path, "calibration file")
    with open(path, "rb") as f:
        h = _read_npy_header(f, path.stat().st_size, str(path))
    spec = specs[0]
    single = len(spec.shape) > 0 and len(h.shape) == len(spec.shape) - 1  # one sample without its batch axis
    _check_headers({spec.name: dataclasses.replace(h, shape=((1,) + h.shape) if single else h.shape)},
                   specs, str(path), first_axis_counts=True)
    a = np.load(path, allow_pickle=False)
    return a[None] if single else a


def _folder_samples(folder: Path, specs: list[InputSpec], pre: ImagePreprocess | None) -> Iterator[Feed]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    arrays = [p for p in files if p.suffix.lower() in (".npy", ".npz")]
    if images and pre is not None:
        yield from _image_samples(images, specs, pre)
        return
    if images and not arrays:
        raise QwtError(f"{folder} holds images but no preprocessing was declared",
                       fix="pass --image-size H,W (and --mean/--std/--scale/--layout as the model needs)")
    for p in arrays:
        if p.suffix.lower() == ".npz":
            yield from _npz_samples(p, specs)
            continue
        if len(specs) != 1:
            raise QwtError(f".npy calibration files need a single-input model; this one has {len(specs)} inputs",
                           notes=[f"file: {p.name}"], fix="store samples as .npz files with one array per input name")
        a = _npy_array(p, specs)
        whole = a.ndim == len(specs[0].shape) + 1  # [n, *input shape]: each a[i] is one whole input
        for i in range(a.shape[0]):
            yield {specs[0].name: a[i] if whole else a[i:i + 1]}


def _image_samples(paths: list[Path], specs: list[InputSpec], pre: ImagePreprocess) -> Iterator[Feed]:
    if len(specs) != 1:
        raise QwtError("image folders need a single-input model", notes=[f"model inputs: {[s.name for s in specs]}"],
                       fix="store samples as .npz files with one array per input name")
    return image_samples(paths, specs[0].name, specs[0].dtype, pre, lambda path: _regular_file(path, "image"))


def open_calibration(source: str | Path | Iterable[Feed] | Callable[[], Iterable[Feed]],
                     specs: list[InputSpec], image_preprocess: ImagePreprocess | None = None) -> CalibrationSet:
    """Build a :class:`CalibrationSet` from any supported source (see module doc)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise QwtError(f"calibration data not found: {path}", fix="pass an existing .npz file or folder to --calib")
        if not path.is_dir():
            _regular_file(path, "calibration file")
        if path.is_dir():
            return CalibrationSet(lambda: _folder_samples(path, specs, image_preprocess), specs, str(path))
        if path.suffix.lower() != ".npz":
            raise QwtError(f"unsupported calibration file {path.name}",
                           fix="pass an .npz (one array per input), or a folder of .npy/.npz/images")
        shapes = [h.shape for h in _npz_members(path, specs).values()]
        n = shapes[0][0] if shapes and shapes[0] else 0
        return CalibrationSet(lambda: _npz_samples(path, specs), specs, str(path), n)
    if callable(source):
        return CalibrationSet(lambda: iter(source()), specs, "python reader")
    samples = list(source)  # a one-shot iterator must be kept to be read more than once
    return CalibrationSet(lambda: iter(samples), specs, "python iterable", len(samples))


def random_calibration(specs: list[InputSpec], n: int, seed: int = 0) -> CalibrationSet:
    """Standard-normal samples; symbolic dims become 1 (batch) or 32 (others)."""
    def factory() -> Iterator[Feed]:
        rng = np.random.default_rng(seed)
        for _ in range(n):
            yield {s.name: rng.standard_normal(
                [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 32) for i, d in enumerate(s.shape)]
            ).astype(s.dtype) for s in specs}
    return CalibrationSet(factory, specs, f"random (seed {seed})", n)
