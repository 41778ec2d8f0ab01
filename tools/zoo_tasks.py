"""Labelled data and task metrics for the zoo models of ``tools/zoo.py``.

Everything is generated deterministically (seeded numpy Generators) from
what the Python packages and Debian ship: natural photos bundled with
scikit-image (``skimage.data``) and scikit-learn (``load_sample_images``),
text rendered with installed TrueType fonts (DejaVu; Liberation and WenQuanYi
Micro Hei when ``fonts-liberation2`` / ``fonts-wqy-microhei`` are installed)
and English words from ``/usr/share/dict/words`` (``wamerican``; a small
built-in vocabulary otherwise).  Calibration data never equals evaluation
data: different seeds, disjoint halves of the word list, disjoint LFW faces.

API
---
``TASKS: dict[str, Task]``, one per zoo model name::

    task = TASKS["ppocr_rec"]
    feeds = task.calib_feeds(model_path, n)      # {input_name: float32 [n,...]}
    np.savez("calib.npz", **feeds)
    metrics = task.evaluate(session, float_session=None)   # {metric: float}

``calib_feeds`` returns fixed-shape arrays (``task.input_shape`` with batch
n).  ``evaluate`` runs *session* (an ``onnxruntime.InferenceSession`` on the
float or quantized model, batch dimension dynamic or fixed) on the task's
evaluation set; ``float_session`` (the float model) is needed for the
agreement metrics of ``ppocr_det`` and ``yolov8n``.

Metrics
-------
ppocr_rec    input [N,3,48,320].  CTC greedy decode.  ``char_acc_<set>``
             = 1 - sum(edit distance) / sum(len(truth)) over the set (total,
             not per-line averaged; clipped at 0), ``line_acc_<set>`` =
             exact-match rate, for sets ``en`` (150 English lines of 1-4
             words, some digits/punctuation), ``zh`` (100 lines of 2-6
             common hanzi: GB2312 level 1) and ``zh_rare`` (50 lines of the
             other hanzi of the model's dictionary that WQY Micro Hei
             renders; float accuracy is much lower there).  English strings
             are compared with spaces removed (the float model often drops
             the space between words: 0.96 with spaces kept).
ppocr_cls    input [N,3,48,192].  ``acc`` of the 0/180 decision on 100
             rendered lines (half rotated by 180 degrees).
orientation  input [N,3,224,224].  ``acc`` of the 4-way decision on 100
             rendered text pages (25 per angle); label k = page rotated
             k*90 degrees clockwise (np.rot90(page, -k)), which is what the
             model's class k ("0","90","180","270") means (checked with the
             float model: np.rot90(page, +1) is predicted as "270").
ppocr_det    input [N,3,512,512].  20 images (12 rendered pages, 8 photos
             with a few overlaid text lines).  ``gt_recall``: fraction of
             ground-truth line boxes matched (IoU>=0.5) by a detected box
             (connected components of prob>0.3 with mean prob>=0.5,
             unclipped by the DB rule, ratio 1.6).  With ``float_session``:
             ``map_iou`` (IoU of the prob>0.3 maps, pooled over all images),
             ``box_recall`` / ``box_precision`` vs the float model's boxes
             (IoU>=0.5), ``prob_cos`` (cosine of the raw probability maps).
yolov8n      input [N,3,320,320].  60 images (photos, crops, flips, LFW face
             mosaics).  Detections: max class score>=0.25, class-aware NMS
             at IoU 0.45.  Always ``n_dets`` (mean detections per image);
             with ``float_session``: ``recall`` / ``precision`` vs float
             detections (same class, IoU>=0.5), ``f1`` (their harmonic mean:
             recall alone rewards a model that detects too much, precision
             one that detects too little), ``box_cos`` (cosine of
             output rows 0:4) and ``score_cos`` (rows 4:22), both pooled
             over all images.

Each Task also has ``input_shape`` (with batch 1) and ``input_name(model)``.
Calibration sets of up to 1024 samples are cheap to render; mind the memory
of ppocr_det: 1024 x 3x512x512 float32 is 3.2 GB.
"""
from __future__ import annotations

import functools
import math
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Task", "TASKS", "ctc_greedy_decode", "edit_distance", "nms",
           "box_iou"]

EVAL_SEED = 20240601
CALIB_SEED = 777

# --------------------------------------------------------------------------
# fonts, words, photos
# --------------------------------------------------------------------------
_FONT_DIRS = ["/usr/share/fonts/truetype", "/usr/share/fonts/opentype",
              "/usr/local/share/fonts"]
_LATIN_FONTS = [
    "dejavu/DejaVuSans.ttf", "dejavu/DejaVuSerif.ttf",
    "dejavu/DejaVuSansMono.ttf", "dejavu/DejaVuSans-Bold.ttf",
    "dejavu/DejaVuSansCondensed.ttf",
    "liberation2/LiberationSans-Regular.ttf",
    "liberation2/LiberationSerif-Regular.ttf",
    "liberation2/LiberationMono-Regular.ttf",
    "liberation2/LiberationSans-Bold.ttf",
    "liberation2/LiberationSerif-Italic.ttf",
]
_CJK_FONTS = ["wqy/wqy-microhei.ttc", "wqy/wqy-zenhei.ttc"]


def _find_fonts(rel: Sequence[str]) -> list[str]:
    found = []
    for r in rel:
        for d in _FONT_DIRS:
            p = os.path.join(d, r)
            if os.path.isfile(p):
                found.append(p)
                break
    return found


@functools.lru_cache(None)
def latin_fonts() -> tuple[str, ...]:
    fonts = _find_fonts(_LATIN_FONTS)
    if not fonts:
        raise RuntimeError("no Latin TrueType font found (install fonts-dejavu-core)")
    return tuple(fonts)


@functools.lru_cache(None)
def cjk_font() -> str | None:
    fonts = _find_fonts(_CJK_FONTS)
    return fonts[0] if fonts else None


@functools.lru_cache(None)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


_FALLBACK_WORDS = """time year people way day man thing woman life child world
school state family student group country problem hand part place case week
company system program question work government number night point home water
room mother area money story fact month lot right study book eye job word
business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body
information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air
teacher force education""".split()


@functools.lru_cache(None)
def english_words() -> tuple[str, ...]:
    """Lower/upper-case ASCII words of 2-10 letters (sorted, deterministic)."""
    words = []
    p = "/usr/share/dict/words"
    if os.path.isfile(p):
        with open(p, encoding="utf-8", errors="ignore") as f:
            for w in f:
                w = w.strip()
                if 2 <= len(w) <= 10 and w.isascii() and w.isalpha():
                    words.append(w)
    if len(words) < 1000:
        words = list(_FALLBACK_WORDS)
    return tuple(sorted(set(words)))


def _word_half(which: int) -> tuple[str, ...]:
    """Disjoint halves of the word list: 0 = evaluation, 1 = calibration."""
    return english_words()[which::2]


def _to_rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.shape[-1] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


_PHOTO_NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "cat",
                "coins", "clock", "immunohistochemistry", "hubble_deep_field",
                "colorwheel", "retina", "moon", "brick", "grass", "gravel",
                "page", "text", "cell", "logo"]


@functools.lru_cache(None)
def photos() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, RGB uint8 HxWx3) of every bundled natural image we can load."""
    out = []
    try:
        import skimage.data as skd
        for n in _PHOTO_NAMES:
            try:
                out.append((n, _to_rgb(getattr(skd, n)())))
            except Exception:      # fetched (not bundled) data, missing pooch
                pass
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images
        imgs = load_sample_images()
        for fn, im in zip(imgs.filenames, imgs.images):
            out.append((pathlib.Path(fn).stem, _to_rgb(im)))
    except Exception:
        pass
    if not out:
        raise RuntimeError("no photos: install scikit-image or scikit-learn")
    return tuple(out)


@functools.lru_cache(None)
def lfw_faces() -> np.ndarray | None:
    """200 LFW faces (25x25 uint8) from scikit-image, or None."""
    try:
        import skimage.data as skd
        f = skd.lfw_subset()
    except Exception:
        return None
    return (np.clip(f, 0, 1) * 255).astype(np.uint8)


def _resize(img: np.ndarray, w: int, h: int, resample=Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((int(w), int(h)), resample))


def _random_crop(rng: np.random.Generator, img: np.ndarray,
                 min_frac: float = 0.5) -> np.ndarray:
    h, w = img.shape[:2]
    f = rng.uniform(min_frac, 1.0)
    ch, cw = max(16, int(h * f)), max(16, int(w * rng.uniform(min_frac, 1.0)))
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    out = img[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _face_mosaic(rng: np.random.Generator, faces: np.ndarray, size: int) -> np.ndarray:
    """A grid of upscaled LFW faces on a random background."""
    k = int(rng.integers(2, 5))               # k x k grid
    cell = size // k
    canvas = np.full((size, size, 3), rng.integers(40, 220, 3), np.uint8)
    for i in range(k):
        for j in range(k):
            f = faces[int(rng.integers(0, len(faces)))]
            s = int(cell * rng.uniform(0.6, 0.95))
            f = _resize(_to_rgb(f), s, s)
            y = i * cell + int(rng.integers(0, cell - s + 1))
            x = j * cell + int(rng.integers(0, cell - s + 1))
            canvas[y:y + s, x:x + s] = f
    return canvas


# --------------------------------------------------------------------------
# text rendering
# --------------------------------------------------------------------------
def _text_colors(rng: np.random.Generator) -> tuple[tuple, tuple]:
    bg = int(rng.integers(200, 256))
    bgc = tuple(int(np.clip(bg + d, 0, 255)) for d in rng.integers(-15, 16, 3))
    fg = int(rng.integers(0, 70))
    fgc = tuple(int(np.clip(fg + d, 0, 255)) for d in rng.integers(-20, 21, 3))
    if rng.random() < 0.15:                    # light text on dark background
        bgc, fgc = tuple(255 - c for c in bgc), tuple(255 - c for c in fgc)
    return fgc, bgc


def render_line(text: str, font_path: str, size: int,
                rng: np.random.Generator) -> np.ndarray:
    """Render one text line as a tight-ish RGB crop (like a detector crop)."""
    font = _font(font_path, size)
    fg, bg = _text_colors(rng)
    ascent, descent = font.getmetrics()
    x0, _, x1, _ = font.getbbox(text)
    padx = int(rng.integers(2, max(3, size // 2)))
    pady_t = int(rng.integers(1, max(2, size // 5)))
    pady_b = int(rng.integers(1, max(2, size // 5)))
    w = (x1 - x0) + 2 * padx
    h = ascent + descent + pady_t + pady_b
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((padx - x0, pady_t), text, font=font, fill=fg)
    return np.asarray(img)


@functools.lru_cache(None)
def _tofu(font_path: str) -> bytes:
    font = _font(font_path, 24)
    return bytes(font.getmask("\ue000"))


def _renderable(font_path: str, ch: str) -> bool:
    font = _font(font_path, 24)
    m = font.getmask(ch)
    if m.getbbox() is None:
        return False
    return bytes(m) != _tofu(font_path)


@functools.lru_cache(None)
def _rec_charset_from_model(model_path: str) -> tuple[str, ...]:
    import onnx
    m = onnx.load(model_path, load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    return tuple(meta["character"].splitlines())


@functools.lru_cache(None)
def _rec_classes() -> tuple[str, ...]:
    """CTC classes of ppocr_rec: blank + metadata character list + space."""
    from zoo import fetch_model
    chars = _rec_charset_from_model(str(fetch_model("ppocr_rec")))
    return ("<blank>",) + chars + (" ",)


@functools.lru_cache(None)
def chinese_chars(kind: str = "all") -> tuple[str, ...]:
    """CJK ideographs in the rec model's dictionary that the CJK font renders.

    kind="all": every such character; "common": those in GB2312 level 1
    (the 3755 most frequent hanzi); "rare": all minus common.
    """
    font = cjk_font()
    if font is None:
        return ()
    if kind != "all":
        common = set(filter(_gb2312_level1, chinese_chars("all")))
        return tuple(c for c in chinese_chars("all")
                     if (c in common) == (kind == "common"))
    return tuple(c for c in _rec_classes()[1:-1]
                 if len(c) == 1 and "\u4e00" <= c <= "\u9fff"
                 and _renderable(font, c))


def _gb2312_level1(c: str) -> bool:
    try:
        b = c.encode("gb2312")
    except UnicodeEncodeError:
        return False
    return len(b) == 2 and 0xB0 <= b[0] <= 0xD7


_PUNCT = [".", ",", "-", ":", "!", "?", "(", ")", "'", "/", "%", "&"]


def _english_text(rng: np.random.Generator, words: Sequence[str],
                  max_chars: int) -> str:
    parts: list[str] = []
    n = int(rng.integers(1, 5))
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            w = str(int(rng.integers(0, 10 ** int(rng.integers(1, 5)))))
        else:
            w = words[int(rng.integers(0, len(words)))]
            if r < 0.25:
                w = w.capitalize()
            elif r < 0.3:
                w = w.upper()
            if rng.random() < 0.1:
                w = w + _PUNCT[int(rng.integers(0, len(_PUNCT)))]
        if parts and len(" ".join(parts + [w])) > max_chars:
            break
        parts.append(w)
    return " ".join(parts)[:max_chars * 2]


def _line_sample(rng: np.random.Generator, lang: str, words: Sequence[str],
                 max_ratio: float) -> tuple[np.ndarray, str]:
    """A rendered line whose width/height ratio fits *max_ratio*.
    lang: "en", "zh" (any hanzi), "zh_common", "zh_rare"."""
    for _ in range(50):
        if lang == "en":
            font = latin_fonts()[int(rng.integers(0, len(latin_fonts())))]
            text = _english_text(rng, words, 24)
        else:
            font = cjk_font()
            zh = chinese_chars(lang[3:] or "all")
            n = int(rng.integers(2, 7))
            text = "".join(zh[int(i)] for i in rng.integers(0, len(zh), n))
        size = int(rng.integers(18, 41))
        img = render_line(text, font, size, rng)
        while img.shape[1] / img.shape[0] > max_ratio and len(text) > 2:
            text = text.rsplit(" ", 1)[0] if (lang == "en" and " " in text) \
                else text[:-1]
            img = render_line(text, font, size, rng)
        if img.shape[1] / img.shape[0] <= max_ratio:
            return img, text
    raise RuntimeError("could not render a line that fits")


def _norm_line(img_rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """PP-OCR rec/cls preprocessing: BGR, h=height keep aspect (<=width),
    (x/255-0.5)/0.5, zero-padded on the right.  -> [3, height, width]."""
    h, w = img_rgb.shape[:2]
    rw = min(width, int(math.ceil(height * w / h)))
    x = _resize(img_rgb, rw, height).astype(np.float32)[:, :, ::-1]
    x = (x / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = x.transpose(2, 0, 1)
    return out


def render_page(rng: np.random.Generator, width: int, height: int,
                words: Sequence[str], zh_frac: float = 0.0,
                size_range: tuple[int, int] = (12, 26),
                bg: np.ndarray | None = None,
                ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Paragraphs of text on a light page (or on *bg*); returns
    (RGB uint8 image, ground-truth line boxes x0,y0,x1,y1)."""
    if bg is None:
        shade = int(rng.integers(225, 256))
        img = Image.new("RGB", (width, height), (shade,) * 3)
        fg = tuple(int(v) for v in rng.integers(0, 60, 3))
    else:
        img = Image.fromarray(bg)
        fg = None
    draw = ImageDraw.Draw(img)
    boxes = []
    margin = int(rng.integers(8, max(9, width // 10)))
    y = margin + int(rng.integers(0, 20))
    fonts = latin_fonts()
    size = int(rng.integers(*size_range))
    font_path = fonts[int(rng.integers(0, len(fonts)))]
    while True:
        zh = zh_frac > 0 and cjk_font() and chinese_chars() and rng.random() < zh_frac
        fp = cjk_font() if zh else font_path
        font = _font(fp, size)
        ascent, descent = font.getmetrics()
        if y + ascent + descent > height - margin:
            break
        x = margin + (int(rng.integers(0, 4)) * size if rng.random() < 0.3 else 0)
        maxw = width - margin - x
        text = ""
        while True:
            if zh:
                cc = chinese_chars()
                word = "".join(cc[int(i)] for i in rng.integers(0, len(cc), int(rng.integers(2, 5))))
                cand = text + word
            else:
                word = words[int(rng.integers(0, len(words)))]
                cand = (text + " " + word) if text else word
            if font.getlength(cand) > maxw:
                break
            text = cand
            if rng.random() < 0.05:     # short line (end of paragraph)
                break
        if text:
            color = fg
            if color is None:           # pick contrasting colour on a photo
                l, t, r, b = draw.textbbox((x, y), text, font=font)
                patch = np.asarray(img)[max(t, 0):b, max(l, 0):r]
                color = (0, 0, 0) if patch.size and patch.mean() > 128 else (255, 255, 255)
            draw.text((x, y), text, font=font, fill=color)
            l, t, r, b = draw.textbbox((x, y), text, font=font)
            boxes.append((l, t, r, b))
        y += int((ascent + descent) * rng.uniform(1.2, 1.8))
        if rng.random() < 0.15:
            y += size
        if rng.random() < 0.1:
            size = int(rng.integers(*size_range))
            font_path = fonts[int(rng.integers(0, len(fonts)))]
    return np.asarray(img), boxes


# --------------------------------------------------------------------------
# metric helpers
# --------------------------------------------------------------------------
def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


def ctc_greedy_decode(probs: np.ndarray, classes: Sequence[str]) -> list[str]:
    """[N,T,C] -> strings: argmax, collapse repeats, drop blank (index 0)."""
    idx = probs.argmax(-1)
    out = []
    for row in idx:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(classes[i] for i in row[keep]))
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes [N,4] x [M,4]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        ious = box_iou(boxes[i:i + 1], boxes[order[1:]])[0]
        order = order[1:][ious < iou]
    return np.asarray(keep, np.int64)


def _match(pred: np.ndarray, ref: np.ndarray, thr: float = 0.5,
           pred_cls=None, ref_cls=None) -> int:
    """Greedy one-to-one matches between pred and ref boxes at IoU>=thr."""
    if len(pred) == 0 or len(ref) == 0:
        return 0
    iou = box_iou(pred, ref)
    if pred_cls is not None:
        iou = iou * (np.asarray(pred_cls)[:, None] == np.asarray(ref_cls)[None, :])
    n = 0
    while True:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        if iou[i, j] < thr:
            return n
        n += 1
        iou[i, :] = -1
        iou[:, j] = -1


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _run(session, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """Run the first output of *session* on x in batches (respects a fixed
    batch dimension of the model input)."""
    inp = session.get_inputs()[0]
    b0 = inp.shape[0] if inp.shape else None
    if isinstance(b0, int) and b0 > 0:
        batch = b0
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        pad = 0
        if isinstance(b0, int) and b0 > 0 and len(xb) < b0:
            pad = b0 - len(xb)
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
        y = session.run([session.get_outputs()[0].name], {inp.name: xb})[0]
        outs.append(y[:len(y) - pad] if pad else y)
    return np.concatenate(outs)


# --------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------
class Task:
    """Base class: a zoo model's calibration data and evaluation."""

    name: str = ""
    input_shape: tuple[int, ...] = ()

    def __init__(self, **sizes: int):
        """Override evaluation-set sizes, e.g. ``RecTask(n_en=30, n_zh=0)``."""
        for k, v in sizes.items():
            if not k.startswith("n_") or not hasattr(self, k):
                raise TypeError(f"{type(self).__name__} has no size {k!r}")
            setattr(self, k, int(v))

    @staticmethod
    def input_name(model_path) -> str:
        import onnx
        m = onnx.load(str(model_path), load_external_data=False)
        inits = {i.name for i in m.graph.initializer}
        return [i.name for i in m.graph.input if i.name not in inits][0]

    def _calib_inputs(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def calib_feeds(self, model_path, n: int, draw: int = 0) -> dict[str, np.ndarray]:
        """{input_name: float32 [n, *input_shape[1:]]} calibration inputs.  ``draw`` 0 is the zoo's
        calibration set; 1, 2, ... are other sets from the same generator (tools/zoo_large_eval.py
        --calib-draws), none of them overlapping the evaluation set's seed."""
        seed = [CALIB_SEED, sum(map(ord, self.name))] + ([draw] if draw else [])
        rng = np.random.default_rng(seed)
        x = self._calib_inputs(n, rng).astype(np.float32)
        assert x.shape == (n,) + tuple(self.input_shape[1:]), x.shape
        return {self.input_name(model_path): x}

    def evaluate(self, session, float_session=None) -> dict[str, float]:
        raise NotImplementedError

    def correct(self, session) -> np.ndarray | None:
        """Per evaluation sample, whether the model got it right (classification tasks; None elsewhere):
        what a paired comparison of two models needs (tools/zoo_large_eval.py)."""
        return None

    def __repr__(self) -> str:
        return f"<Task {self.name} input={self.input_shape}>"


class RecTask(Task):
    name = "ppocr_rec"
    input_shape = (1, 3, 48, 320)
    n_en, n_zh, n_zh_rare = 150, 100, 50

    def _lines(self, rng, n, lang, words):
        return [_line_sample(rng, lang, words, 320 / 48) for _ in range(n)]

    def _calib_inputs(self, n, rng):
        words = _word_half(1)
        out = np.zeros((n,) + self.input_shape[1:], np.float32)
        have_zh = bool(chinese_chars())
        for i in range(n):
            lang = "zh" if have_zh and rng.random() < 0.4 else "en"
            img, _ = _line_sample(rng, lang, words, 320 / 48)
            out[i] = _norm_line(img, 48, 320)
        return out

    @functools.cached_property
    def eval_set(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        rng = np.random.default_rng([EVAL_SEED, 1])
        sets = {}
        langs = [("en", self.n_en)]
        if chinese_chars():
            langs += [("zh", self.n_zh), ("zh_rare", self.n_zh_rare)]
        for lang, n in langs:
            if n <= 0:
                continue
            lines = self._lines(rng, n, "zh_common" if lang == "zh" else lang,
                                _word_half(0))
            x = np.stack([_norm_line(img, 48, 320) for img, _ in lines])
            sets[lang] = (x, [t for _, t in lines])
        return sets

    @staticmethod
    def classes_for(session, float_session=None) -> tuple[str, ...]:
        for s in (session, float_session):
            if s is None:
                continue
            meta = s.get_modelmeta().custom_metadata_map
            if "character" in meta:
                return ("<blank>",) + tuple(meta["character"].splitlines()) + (" ",)
        return _rec_classes()

    def evaluate(self, session, float_session=None):
        classes = self.classes_for(session, float_session)
        res = {}
        for lang, (x, truth) in self.eval_set.items():
            pred = ctc_greedy_decode(_run(session, x), classes)
            if lang == "en":
                pred = [p.replace(" ", "") for p in pred]
                truth = [t.replace(" ", "") for t in truth]
            errs = sum(edit_distance(p, t) for p, t in zip(pred, truth))
            total = sum(len(t) for t in truth)
            res[f"char_acc_{lang}"] = max(0.0, 1 - errs / total)
            res[f"line_acc_{lang}"] = float(np.mean([p == t for p, t in zip(pred, truth)]))
        return res


class _ClassifierTask(Task):
    """A classifier scored by accuracy on ``eval_set`` (inputs, labels) and by agreement with float."""

    eval_set: tuple[np.ndarray, np.ndarray]

    def evaluate(self, session, float_session=None):
        pred = self.predict(session)
        res = {"acc": float(np.mean(pred == self.eval_set[1]))}
        if float_session is not None:
            res["agree_float"] = float(np.mean(pred == self.predict(float_session)))
        return res

    def predict(self, session) -> np.ndarray:
        """The class each evaluation sample is given."""
        return _run(session, self.eval_set[0]).argmax(-1)

    def correct(self, session):
        return self.predict(session) == self.eval_set[1]


class ClsTask(_ClassifierTask):
    name = "ppocr_cls"
    input_shape = (1, 3, 48, 192)
    n_eval = 2000  # with 100, float (0.99) and every int8 variant were one sample apart: too coarse to rank

    def _samples(self, rng, n, words):
        xs, ys = [], []
        have_zh = bool(chinese_chars())
        for i in range(n):
            lang = "zh" if have_zh and rng.random() < 0.3 else "en"
            img, _ = _line_sample(rng, lang, words, 320 / 48)
            label = i % 2
            if label:
                img = np.ascontiguousarray(img[::-1, ::-1])
            xs.append(_norm_line(img, 48, 192))
            ys.append(label)
        return np.stack(xs), np.asarray(ys)

    def _calib_inputs(self, n, rng):
        return self._samples(rng, n, _word_half(1))[0]

    @functools.cached_property
    def eval_set(self):
        return self._samples(np.random.default_rng([EVAL_SEED, 2]), self.n_eval,
                             _word_half(0))


class OrientationTask(_ClassifierTask):
    """Class k ("0","90","180","270"): the page is rotated k*90 degrees
    clockwise, i.e. ``np.rot90(page, -k)``."""
    name = "orientation"
    input_shape = (1, 3, 224, 224)
    n_per_angle = 25

    @staticmethod
    def preprocess(img_rgb: np.ndarray) -> np.ndarray:
        h, w = img_rgb.shape[:2]
        s = 256 / min(h, w)
        img = _resize(img_rgb, round(w * s), round(h * s), Image.LANCZOS)
        h, w = img.shape[:2]
        y, x = (h - 224) // 2, (w - 224) // 2
        img = img[y:y + 224, x:x + 224, ::-1].astype(np.float32) / 255.0   # BGR
        mean = np.array([0.485, 0.456, 0.406], np.float32)
        std = np.array([0.229, 0.224, 0.225], np.float32)
        return ((img - mean) / std).transpose(2, 0, 1)

    def _page(self, rng, words):
        portrait = rng.random() < 0.7
        w, h = (int(rng.integers(360, 560)), int(rng.integers(480, 760)))
        if not portrait:
            w, h = h, w
        img, _ = render_page(rng, w, h, words,
                             zh_frac=0.0 if rng.random() < 0.8 else 0.5,
                             size_range=(12, 24))
        return img

    def _samples(self, rng, n, words):
        xs, ys = [], []
        for i in range(n):
            k = i % 4
            page = np.ascontiguousarray(np.rot90(self._page(rng, words), -k))
            xs.append(self.preprocess(page))
            ys.append(k)
        return np.stack(xs), np.asarray(ys)

    def _calib_inputs(self, n, rng):
        return self._samples(rng, n, _word_half(1))[0]

    @functools.cached_property
    def eval_set(self):
        return self._samples(np.random.default_rng([EVAL_SEED, 3]),
                             4 * self.n_per_angle, _word_half(0))


class DetTask(Task):
    name = "ppocr_det"
    input_shape = (1, 3, 512, 512)
    n_pages, n_photos = 12, 8
    thresh, box_thresh, unclip_ratio = 0.3, 0.5, 1.6

    @staticmethod
    def preprocess(img_rgb: np.ndarray) -> np.ndarray:
        x = img_rgb[:, :, ::-1].astype(np.float32)                 # BGR
        return ((x / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)

    def _sample(self, rng, kind, words, photo_pool):
        S = self.input_shape[2]
        if kind == "page":
            img, boxes = render_page(rng, S, S, words,
                                     zh_frac=float(rng.choice([0.0, 0.3])),
                                     size_range=(14, 32))
        else:
            name, ph = photo_pool[int(rng.integers(0, len(photo_pool)))]
            ph = _random_crop(rng, ph, 0.6)
            bg = _resize(ph, S, S)
            # a few text lines on the photo
            img, boxes = render_page(rng, S, S, words, size_range=(20, 40), bg=bg)
            keep = rng.random(len(boxes)) < 0.35
            if boxes and not keep.any():
                keep[0] = True
            # re-render only the kept lines: simpler to blank out the rest
            if boxes:
                arr = np.array(img)
                for (l, t, r, b), k in zip(boxes, keep):
                    if not k:
                        arr[max(t, 0):b, max(l, 0):r] = bg[max(t, 0):b, max(l, 0):r]
                img = arr
                boxes = [bx for bx, k in zip(boxes, keep) if k]
        return self.preprocess(img), boxes

    def _calib_inputs(self, n, rng):
        pool = photos()[1::2]
        return np.stack([self._sample(rng, "page" if i % 2 == 0 else "photo",
                                      _word_half(1), pool)[0] for i in range(n)])

    @functools.cached_property
    def eval_set(self):
        rng = np.random.default_rng([EVAL_SEED, 4])
        pool = photos()[0::2]
        xs, gts = [], []
        for i in range(self.n_pages + self.n_photos):
            x, b = self._sample(rng, "page" if i < self.n_pages else "photo",
                                _word_half(0), pool)
            xs.append(x)
            gts.append(np.asarray(b, np.float64).reshape(-1, 4))
        return np.stack(xs), gts

    def boxes(self, prob: np.ndarray) -> np.ndarray:
        """DB-style boxes (xyxy, unclipped) from one [H,W] probability map."""
        from scipy import ndimage
        mask = prob > self.thresh
        mask = ndimage.binary_dilation(mask, np.ones((2, 2), bool))
        lab, n = ndimage.label(mask)
        out = []
        for k, sl in enumerate(ndimage.find_objects(lab), 1):
            if sl is None:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            w, h = x1 - x0, y1 - y0
            if min(w, h) < 3:
                continue
            if prob[sl][lab[sl] == k].mean() < self.box_thresh:
                continue
            d = w * h * self.unclip_ratio / (2 * (w + h))
            out.append((x0 - d, y0 - d, x1 + d, y1 + d))
        return np.asarray(out, np.float64).reshape(-1, 4)

    def evaluate(self, session, float_session=None):
        x, gts = self.eval_set
        prob = _run(session, x, 4)[:, 0]
        boxes = [self.boxes(p) for p in prob]
        n_gt = sum(len(g) for g in gts)
        res = {"gt_recall": sum(_match(b, g) for b, g in zip(boxes, gts)) / max(n_gt, 1)}
        if float_session is not None:
            fprob = _run(float_session, x, 4)[:, 0]
            fboxes = [self.boxes(p) for p in fprob]
            m, fm = prob > self.thresh, fprob > self.thresh
            res["map_iou"] = float((m & fm).sum() / max((m | fm).sum(), 1))
            matched = sum(_match(b, f) for b, f in zip(boxes, fboxes))
            res["box_recall"] = matched / max(sum(map(len, fboxes)), 1)
            res["box_precision"] = matched / max(sum(map(len, boxes)), 1)
            res["prob_cos"] = _cos(prob, fprob)
        return res


class YoloTask(Task):
    name = "yolov8n"
    input_shape = (1, 3, 320, 320)
    n_eval = 60
    score_thresh, nms_iou, match_iou = 0.25, 0.45, 0.5

    @staticmethod
    def preprocess(img_rgb: np.ndarray, size: int = 320) -> np.ndarray:
        h, w = img_rgb.shape[:2]
        m = max(h, w)
        sq = np.zeros((m, m, 3), np.uint8)                 # pad right/bottom
        sq[:h, :w] = img_rgb
        x = _resize(sq, size, size).astype(np.float32) / 255.0   # RGB
        return x.transpose(2, 0, 1)

    def _images(self, rng, n, pool, faces):
        """i%3 == 0: a photo (whole or a crop), 1: astronaut crop (the only
        bundled photo with a person), 2: LFW face mosaic."""
        people, others = pool
        out = []
        for i in range(n):
            r = i % 3
            if r == 2 and faces is not None:
                out.append(_face_mosaic(rng, faces, 320))
            elif r == 1:
                out.append(_random_crop(rng, people, 0.4))
            else:
                name, ph = others[int(rng.integers(0, len(others)))]
                out.append(ph if rng.random() < 0.5 else _random_crop(rng, ph))
        return out

    def _pools(self, which: int):
        ph = list(photos())
        faces = lfw_faces()
        if faces is not None:
            faces = faces[which::2]
        # the astronaut is the only photo with people: in both pools
        people = [p for n, p in ph if n == "astronaut"] or [ph[0][1]]
        others = [p for p in ph if p[0] != "astronaut"][which::2]
        return (people[0], others), faces

    def _calib_inputs(self, n, rng):
        pool, faces = self._pools(1)
        return np.stack([self.preprocess(im) for im in self._images(rng, n, pool, faces)])

    @functools.cached_property
    def eval_set(self):
        pool, faces = self._pools(0)
        rng = np.random.default_rng([EVAL_SEED, 5])
        return np.stack([self.preprocess(im) for im in self._images(rng, self.n_eval, pool, faces)])

    def decode(self, out: np.ndarray):
        """[22, A] raw output -> (xyxy [K,4], score [K], class [K]) after NMS."""
        p = out.T
        scores = p[:, 4:]
        cls = scores.argmax(1)
        sc = scores.max(1)
        keep = sc >= self.score_thresh
        p, cls, sc = p[keep], cls[keep], sc[keep]
        xyxy = np.concatenate([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1)
        # class-aware NMS: offset boxes per class
        off = xyxy + (cls[:, None] * 4096.0)
        k = nms(off, sc, self.nms_iou)
        return xyxy[k], sc[k], cls[k]

    def evaluate(self, session, float_session=None):
        x = self.eval_set
        out = _run(session, x)
        dets = [self.decode(o) for o in out]
        res = {"n_dets": float(np.mean([len(d[0]) for d in dets]))}
        if float_session is not None:
            fout = _run(float_session, x)
            fdets = [self.decode(o) for o in fout]
            matched = sum(_match(d[0], f[0], self.match_iou, d[2], f[2])
                          for d, f in zip(dets, fdets))
            res["recall"] = matched / max(sum(len(f[0]) for f in fdets), 1)
            res["precision"] = matched / max(sum(len(d[0]) for d in dets), 1)
            res["f1"] = f1(res["recall"], res["precision"])
            res["box_cos"] = _cos(out[:, :4], fout[:, :4])
            res["score_cos"] = _cos(out[:, 4:], fout[:, 4:])
            res["float_n_dets"] = float(np.mean([len(f[0]) for f in fdets]))
        return res


def f1(recall: float, precision: float) -> float:
    return 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0


TASKS: dict[str, Task] = {t.name: t for t in
                          [DetTask(), RecTask(), ClsTask(), YoloTask(), OrientationTask()]}


def _ensure_zoo_importable() -> None:
    import sys
    here = str(pathlib.Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)


_ensure_zoo_importable()


def main(argv: list[str] | None = None) -> int:
    """``python tools/zoo_tasks.py [names...]``: float evaluation report."""
    import argparse
    import time
    import onnxruntime as ort
    from zoo import fetch_model
    ap = argparse.ArgumentParser(description="evaluate float zoo models")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    for name in args.names or list(TASKS):
        path = fetch_model(name)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        t0 = time.perf_counter()
        TASKS[name].eval_set                       # noqa: B018 (build data)
        t1 = time.perf_counter()
        res = TASKS[name].evaluate(sess, sess)
        t2 = time.perf_counter()
        print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in res.items())
              + f"  (data {t1 - t0:.1f}s, eval {t2 - t1:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
