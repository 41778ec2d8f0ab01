"""Folders of images as calibration samples: decoded with Pillow (any bit depth), resized, scaled, normalized
and laid out as ``calib_data.ImagePreprocess`` says."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .config import MAX_SAMPLE_BYTES
from .errors import QwtError


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
        if self.size[0] * self.size[1] * 3 * 4 > MAX_SAMPLE_BYTES:
            raise bad("--image-size", self.size, f"one image would take over {MAX_SAMPLE_BYTES // 2**20} MiB as "
                                                 "float32: pass the model's input size")
        if not all(v > 0 for v in self.std):
            raise bad("--std", self.std, "every standard deviation must be > 0")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise bad("--scale", self.scale, "pass a finite factor > 0, e.g. 0.00392 (1/255)")
        if self.layout.upper() not in ("NCHW", "NHWC") or self.channel_order.upper() not in ("RGB", "BGR"):
            raise bad("--layout / --channel-order", (self.layout, self.channel_order), "use NCHW|NHWC and RGB|BGR")


def image_samples(paths: list[Path], name: str, dtype: np.dtype, pre, check_file: Callable[[Path], None],
                  ) -> Iterator[dict[str, np.ndarray]]:
    """One feed ``{name: [1, ...] array of dtype}`` per image in ``paths``, preprocessed as ``pre``
    (``calib_data.ImagePreprocess``) says; ``check_file`` vets each path before it is opened."""
    try:
        import PIL.Image  # noqa: F401  (read in read_image)
    except ImportError:
        raise QwtError("reading image folders needs Pillow", fix="pip install 'qwt2-onnx[images]' (or pillow)") from None
    h, w = pre.size
    for p in paths:
        check_file(p)
        x = read_image(p, (w, h))
        if pre.channel_order.upper() == "BGR":
            x = x[..., ::-1]
        x = (x * pre.scale - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        if pre.layout.upper() == "NCHW":
            x = x.transpose(2, 0, 1)
        yield {name: np.ascontiguousarray(x[None], dtype=dtype)}


def read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """An image as float32 RGB [H, W, 3] on the 0-255 scale whatever its bit depth (a 16-bit PNG is scaled
    by 255/65535, not clipped to 255), resized to ``size`` (W, H).  A file Pillow cannot decode, a
    truncated one or a decompression bomb is a QwtError naming the file."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                    gray = np.asarray(img, dtype=np.float32)
                    if mode != "F" and (mode != "I" or gray.max(initial=0) > 255):
                        gray = gray * (255.0 / 65535.0)  # 16-bit samples
                    plane = Image.fromarray(gray.astype(np.float32), mode="F").resize(size, Image.BILINEAR)
                    return np.repeat(np.asarray(plane, np.float32)[..., None], 3, axis=2)
                rgb = img.convert("RGB").resize(size, Image.BILINEAR)
                return np.asarray(rgb, dtype=np.float32)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise QwtError(f"image {path} is too large to decode safely (a decompression bomb?)",
                       notes=[str(e)[:200]], fix="remove it from the calibration folder or resize it") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as e:
        raise QwtError(f"cannot read image {path}", notes=[f"{type(e).__name__}: {str(e)[:200]}"],
                       fix="remove or replace the corrupt or truncated file") from None
