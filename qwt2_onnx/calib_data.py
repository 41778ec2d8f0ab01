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


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """How a folder of images becomes model input."""

    size: tuple[int, int]  # (height, width)
    layout: str = "NCHW"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        def bad(what: str, value, fix: str) -> QwtError:
            return QwtError(f"image preprocessing: {what} {value!r} is invalid", fix=fix)

        if len(self.size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.size):
            raise bad("--image-size", self.size, "pass two whole numbers > 0 as H,W, e.g. --image-size 224,224")
        for what, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) != 3 or not all(np.isfinite(v) for v in values):
                raise bad(what, values, f"pass 3 finite numbers (R,G,B), e.g. {what} 0.485,0.456,0.406")
        if not all(v > 0 for v in self.std):
            raise bad("--std", self.std, "every standard deviation must be > 0")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise bad("--scale", self.scale, "pass a finite factor > 0, e.g. 0.00392 (1/255)")
        if self.layout.upper() not in ("NCHW", "NHWC") or self.channel_order.upper() not in ("RGB", "BGR"):
            raise bad("--layout / --channel-order", (self.layout, self.channel_order), "use NCHW|NHWC and RGB|BGR")


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
        count = sum(1 for _ in self)
        self.length = count
        return count

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


def _check_array(a: np.ndarray, spec: InputSpec, index: int, where: str) -> None:
    if a.dtype != spec.dtype:
        raise QwtError(f"calibration input '{spec.name}' has dtype {a.dtype}, the model expects {spec.dtype}",
                       notes=[f"sample {index} of {where}"], fix=f"convert the data with .astype(np.{spec.dtype})")
    if spec.shape and a.ndim != len(spec.shape):
        raise QwtError(f"calibration input '{spec.name}' has rank {a.ndim}, the model expects rank {len(spec.shape)}",
                       notes=[f"sample {index} of {where}: shape {list(a.shape)}", f"model input shape {spec.shape_str()}"],
                       fix="for .npz data the first axis counts samples: each array is [samples, ...model shape without batch]")
    for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
        if isinstance(want, int) and want > 0 and want != got and not (axis == 0 and got == 1):
            raise QwtError(f"calibration input '{spec.name}' has shape {list(a.shape)}, the model expects {spec.shape_str()}",
                           notes=[f"sample {index} of {where}", f"axis {axis}: expected {want}, got {got}"],
                           fix="resize the calibration data to the model's input shape")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise QwtError(f"calibration input '{spec.name}' sample {index} holds {bad} NaN/Inf values",
                       notes=[f"source: {where}"], fix="clean the calibration data (NaN/Inf ranges cannot be quantized)")


def _npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array in an .npz, read from the headers only."""
    try:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for member in zf.namelist():
                if member.endswith(".npy"):
                    with zf.open(member) as f:
                        out[member[:-4]] = _read_npy_header(f)[:2]
            return out
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise QwtError(f"cannot read calibration file {path}", notes=[f"{type(e).__name__}: {e}"],
                       fix="pass an .npz written by numpy.savez") from None


def _read_npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), dtype, fortran


def _npz_samples(path: Path) -> Iterator[Feed]:
    """Stream an .npz one sample at a time: memory stays at one sample per input."""
    members = _npz_members(path)
    counts = {k: (shape[0] if shape else 0) for k, (shape, _) in members.items()}
    if len(set(counts.values())) > 1:
        raise QwtError(f"arrays in {path} have different sample counts", notes=[f"{counts}"],
                       fix="every array's first axis must count the same samples")
    with zipfile.ZipFile(path) as zf:
        streams = {}
        for key in members:
            f = zf.open(key + ".npy")
            shape, dtype, fortran = _read_npy_header(f)
            if dtype.hasobject or (fortran and len(shape) > 1):
                raise QwtError(f"array '{key}' in {path} is stored as {'objects' if dtype.hasobject else 'Fortran order'}",
                               fix="save plain C-ordered numeric arrays with numpy.savez")
            streams[key] = (f, (1,) + shape[1:], dtype)
        for _ in range(next(iter(counts.values()), 0)):
            feed = {}
            for key, (f, shape, dtype) in streams.items():
                nbytes = int(np.prod(shape)) * dtype.itemsize
                feed[key] = np.frombuffer(f.read(nbytes), dtype=dtype).reshape(shape)
            yield feed


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
            yield from _npz_samples(p)
            continue
        if len(specs) != 1:
            raise QwtError(f".npy calibration files need a single-input model; this one has {len(specs)} inputs",
                           notes=[f"file: {p.name}"], fix="store samples as .npz files with one array per input name")
        a = np.load(p, allow_pickle=False)
        if len(specs[0].shape) and a.ndim == len(specs[0].shape) - 1:
            a = a[None]
        for i in range(a.shape[0]):
            yield {specs[0].name: a[i:i + 1]}


def _image_samples(paths: list[Path], specs: list[InputSpec], pre: ImagePreprocess) -> Iterator[Feed]:
    try:
        from PIL import Image
    except ImportError:
        raise QwtError("reading image folders needs Pillow", fix="pip install 'qwt2-onnx[images]'") from None
    if len(specs) != 1:
        raise QwtError("image folders need a single-input model", notes=[f"model inputs: {[s.name for s in specs]}"],
                       fix="store samples as .npz files with one array per input name")
    h, w = pre.size
    for p in paths:
        img = Image.open(p).convert("RGB").resize((w, h), Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32)
        if pre.channel_order.upper() == "BGR":
            x = x[..., ::-1]
        x = (x * pre.scale - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        if pre.layout.upper() == "NCHW":
            x = x.transpose(2, 0, 1)
        yield {specs[0].name: np.ascontiguousarray(x[None], dtype=specs[0].dtype)}


def open_calibration(source: str | Path | Iterable[Feed] | Callable[[], Iterable[Feed]],
                     specs: list[InputSpec], image_preprocess: ImagePreprocess | None = None) -> CalibrationSet:
    """Build a :class:`CalibrationSet` from any supported source (see module doc)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise QwtError(f"calibration data not found: {path}", fix="pass an existing .npz file or folder to --calib")
        if path.is_dir():
            return CalibrationSet(lambda: _folder_samples(path, specs, image_preprocess), specs, str(path))
        if path.suffix.lower() != ".npz":
            raise QwtError(f"unsupported calibration file {path.name}",
                           fix="pass an .npz (one array per input), or a folder of .npy/.npz/images")
        shapes = [shape for shape, _ in _npz_members(path).values()]
        n = shapes[0][0] if shapes and shapes[0] else 0
        return CalibrationSet(lambda: _npz_samples(path), specs, str(path), n)
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
