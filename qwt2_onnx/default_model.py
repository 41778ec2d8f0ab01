"""The embedded default: a small digits CNN shipped with the package.

Trained by ``tools/train_default.py`` on scikit-learn's bundled digits data
set; calibration samples come from the training split, evaluation samples
(with labels) from the held-out test split.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from .runtime import make_session

DATA = resources.files("qwt2_onnx") / "data"


def model_path() -> Path:
    return Path(str(DATA / "digits_cnn.onnx"))


def calib_path() -> Path:
    return Path(str(DATA / "digits_calib.npz"))


def accuracy(model: onnx.ModelProto | str, optimized: bool) -> float:
    """Top-1 accuracy on the held-out test split."""
    with np.load(str(DATA / "digits_eval.npz")) as z:
        images, labels = z["image"], z["label"]
    sess = make_session(model if isinstance(model, onnx.ModelProto) else str(model), optimized=optimized)
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: images})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))
