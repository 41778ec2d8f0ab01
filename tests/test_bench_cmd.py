"""``qwt2-onnx bench`` (issue 22): three compiles of the user's model compared, each in its own process."""
from __future__ import annotations

import json
import subprocess
import sys

import onnx
from tiny_models import calib_npz, conv_net


def _bench(tmp_path, *args):
    onnx.save(conv_net(), tmp_path / "m.onnx")
    calib = calib_npz(tmp_path / "c.npz", n=16)
    return subprocess.run([sys.executable, "-m", "qwt2_onnx", "bench", str(tmp_path / "m.onnx"), "--calib", str(calib),
                           "--latency-runs", "3", *args], capture_output=True, text=True)


def test_bench_compares_three_compiles_and_writes_the_table(tmp_path):
    task = tmp_path / "task.py"
    task.write_text("import numpy as np\n"
                    "class Mean:\n"
                    "    def evaluate(self, session, float_session=None):\n"
                    "        x = np.ones((1, 3, 8, 8), np.float32)\n"
                    "        return {'mean_out': float(session.run(None, {'x': x})[0].mean())}\n")
    proc = _bench(tmp_path, "-o", str(tmp_path / "out"), "--task", f"{task}:Mean")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"ort", "plain", "cwac"} and all(r["ok"] for r in rows.values()), rows
    for r in rows.values():
        assert r["seconds"] > 0 and r["peak_rss_mib"] > 10 and r["latency_ratio"] > 0
        assert all(v["cosine"] > 0.9 for v in r["fidelity"].values()), r["fidelity"]
        assert set(r["task"]) == {"mean_out"}
    assert set(report["float_task"]) == {"mean_out"} and report["calib_samples"] == 16
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "onnxruntime quantize_static" in table and "qwt2-onnx (CWAC)" in table and "mean_out" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.md"]


def test_bench_refuses_a_bad_task_before_compiling(tmp_path):
    proc = _bench(tmp_path, "--task", "no_such_module_xyz:Task", "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "cannot load the task" in proc.stderr
    assert not (tmp_path / "out").exists()
