"""Train the default example model shipped with qwt2-onnx and write its data files.

This script trains a small convolutional classifier on scikit-learn's bundled
``load_digits()`` data set (8x8 grayscale images of the digits 0-9, 1797
samples, no download needed), exports it to ONNX, and writes the calibration and
evaluation data the package uses as its default/example model:

* ``qwt2_onnx/data/digits_cnn.onnx``  -- float32 model, opset 13, input
  ``image`` [N,1,8,8] float32 (pixels scaled to [0,1], i.e. raw value / 16),
  output ``logits`` [N,10]; dynamic batch axis.  It is exported with the
  TorchScript exporter (``dynamo=False``) and ``do_constant_folding=False`` so
  that the BatchNormalization nodes stay in the graph: the compiler is expected
  to fold them into the preceding Conv itself.
* ``qwt2_onnx/data/digits_calib.npz`` -- ``image`` [256,1,8,8] float32, drawn
  from the training split (calibration set for quantization).
* ``qwt2_onnx/data/digits_eval.npz``  -- ``image`` [540,1,8,8] float32 and
  ``label`` [540] int64: the held-out test split (stratified 70/30 split,
  ``random_state=0``).
* ``qwt2_onnx/data/digits_cnn.json``  -- metadata (data set, split sizes, float
  test accuracy of torch and onnxruntime, training command, versions).

Architecture::

    Conv(1->16, 3, pad 1)            + BatchNorm + ReLU   8x8
    Conv(16->32, 3, stride 2, pad 1) + BatchNorm + ReLU   4x4
    Conv(32->64, 3, pad 1)           + BatchNorm + ReLU   4x4
    Conv(64->64, 3, stride 2, pad 1)             + ReLU   2x2
    Flatten -> Linear(256->64) + ReLU -> Linear(64->10)

Training is deterministic: fixed seeds, ``torch.use_deterministic_algorithms``
and a single CPU thread.  Light augmentation (random shifts of up to one pixel)
is used.  After export the script checks with onnxruntime that the ONNX model
reproduces the PyTorch logits (max abs diff <= 1e-4) and accuracy.

Run it from the repository root::

    pip install torch==2.13.0      # CPU build; only needed for this script
    python tools/train_default.py

PyTorch is needed only to (re)generate these files; the qwt2_onnx package
itself does not depend on torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np

SEED = 0
TEST_SIZE = 0.3
N_CALIB = 256
EPOCHS = 60
BATCH_SIZE = 32
LR = 3e-3
MIN_ACCURACY = 0.97
OPSET = 13

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "qwt2_onnx" / "data"
ONNX_PATH = DATA_DIR / "digits_cnn.onnx"
CALIB_PATH = DATA_DIR / "digits_calib.npz"
EVAL_PATH = DATA_DIR / "digits_eval.npz"
META_PATH = DATA_DIR / "digits_cnn.json"


def load_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(y_test),
    )


def build_model():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def random_shift(torch, x, gen):
    """Shift each image by a random offset in {-1,0,1}^2, filling with zeros."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    offs = torch.randint(0, 3, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + 8, dx : dx + 8]
    return out


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    try:
        import torch
    except ImportError:
        print("this script needs PyTorch: pip install torch==2.13.0", file=sys.stderr)
        return 1
    import onnx
    import onnxruntime as ort

    os.environ.setdefault("PYTHONHASHSEED", str(SEED))
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    x_train, x_test, y_train, y_test = load_data()
    print(f"train {x_train.shape[0]}  test {x_test.shape[0]}")

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")

    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    xv = torch.from_numpy(x_test)

    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    loss_fn = torch.nn.CrossEntropyLoss()

    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(xt.shape[0], generator=gen)
        total = 0.0
        for start in range(0, xt.shape[0], BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            if idx.numel() < 2:  # BatchNorm needs more than one sample
                continue
            xb = random_shift(torch, xt[idx], gen)
            opt.zero_grad()
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        sched.step()
        if (epoch + 1) % 10 == 0 or epoch == EPOCHS - 1:
            model.eval()
            with torch.no_grad():
                acc = accuracy(model(xv).numpy(), y_test)
            print(f"epoch {epoch + 1:3d}  loss {total / xt.shape[0]:.4f}  test acc {acc:.4f}")

    model.eval()
    with torch.no_grad():
        torch_logits = model(xv).numpy()
    torch_acc = accuracy(torch_logits, y_test)
    if torch_acc < MIN_ACCURACY:
        print(f"test accuracy {torch_acc:.4f} < {MIN_ACCURACY}", file=sys.stderr)
        return 1

    DATA_DIR.mkdir(parents=True, exist_ok=True)

    # Export.  do_constant_folding=False keeps BatchNormalization nodes (the eval
    # peephole that fuses Conv+BN only runs together with constant folding).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(ONNX_PATH),
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
            do_constant_folding=False,
            export_params=True,
        )
    proto = onnx.load(str(ONNX_PATH))
    onnx.checker.check_model(proto)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    print("ONNX ops:", dict(sorted(ops.items())))
    for required in ("Conv", "BatchNormalization"):
        assert ops.get(required, 0) > 0, f"no {required} node in the exported graph"
    assert ops.get("Gemm", 0) + ops.get("MatMul", 0) > 0, "no Gemm/MatMul node"
    graph_inputs = [i.name for i in proto.graph.input]
    assert graph_inputs == ["image"], graph_inputs
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert len(proto.graph.initializer) > 0

    # Verify with onnxruntime.
    sess = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"image": x_test})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    ort_acc = accuracy(ort_logits, y_test)
    print(f"torch acc {torch_acc:.4f}  onnxruntime acc {ort_acc:.4f}  max |diff| {max_diff:.2e}")
    assert max_diff <= 1e-4, max_diff
    assert ort_acc == torch_acc, (ort_acc, torch_acc)

    # Calibration set: N_CALIB training images, chosen with a fixed seed.
    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(x_train.shape[0], size=N_CALIB, replace=False))
    np.savez_compressed(CALIB_PATH, image=x_train[calib_idx].astype(np.float32))
    np.savez_compressed(
        EVAL_PATH, image=x_test.astype(np.float32), label=y_test.astype(np.int64)
    )

    meta = {
        "model": ONNX_PATH.name,
        "dataset": "sklearn.datasets.load_digits (8x8 grayscale, 10 classes, 1797 samples)",
        "preprocessing": "pixel / 16.0 -> float32 in [0,1], layout [N,1,8,8]",
        "input": {"name": "image", "shape": ["N", 1, 8, 8], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["N", 10], "dtype": "float32"},
        "opset": OPSET,
        "split": {
            "method": "sklearn.model_selection.train_test_split, stratified",
            "test_size": TEST_SIZE,
            "random_state": SEED,
            "train": int(x_train.shape[0]),
            "test": int(x_test.shape[0]),
        },
        "calibration": {
            "file": CALIB_PATH.name,
            "source": "training split",
            "samples": N_CALIB,
        },
        "evaluation": {"file": EVAL_PATH.name, "source": "test split", "samples": int(x_test.shape[0])},
        "parameters": int(n_params),
        "onnx_ops": dict(sorted(ops.items())),
        "float_test_accuracy": {"torch": round(torch_acc, 6), "onnxruntime": round(ort_acc, 6)},
        "torch_vs_onnxruntime_max_abs_diff": max_diff,
        "training": {
            "command": "python tools/train_default.py",
            "epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
            "optimizer": f"Adam(lr={LR}, weight_decay=1e-4), cosine schedule",
            "augmentation": "random shift of up to 1 px in x and y (zero fill)",
            "seed": SEED,
            "deterministic": True,
            "threads": 1,
        },
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "sha256": {p.name: sha256(p) for p in (ONNX_PATH, CALIB_PATH, EVAL_PATH)},
    }
    META_PATH.write_text(json.dumps(meta, indent=2) + "\n")

    for p in (ONNX_PATH, CALIB_PATH, EVAL_PATH, META_PATH):
        print(f"wrote {p.relative_to(REPO_ROOT)}  ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
