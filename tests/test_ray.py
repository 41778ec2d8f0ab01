"""The CWAC fit over a real local Ray cluster (issue 25): a head and a second node joined on loopback, one CPU
each, started by the fixture and stopped afterwards even on failure."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from qwt2_onnx import CompileConfig, QwtError, compile_model
from qwt2_onnx.calib_data import CalibrationSet, InputSpec
from qwt2_onnx.config import CwacConfig, QuantConfig
from tiny_models import conv_net

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install '.[ray]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([exe, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard",
                        "false", "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([exe, "start", "--address", address, "--num-cpus", "1", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=180)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([exe, "stop", "--force"], env=env, capture_output=True, timeout=180)


def _npz(path: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    np.savez(path, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    return path


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ppocr_cls", "orientation"])
def test_a_zoo_model_compiled_over_the_cluster_is_byte_identical(cluster, name, zoo_path, tmp_path):
    """2 and 3 shard workers on two nodes write the same bytes as one process (model and report data)."""
    from zoo_tasks import TASKS

    model = zoo_path(name)
    feeds = TASKS[name].calib_feeds(model, 20)
    calib = _npz(tmp_path / "calib.npz", [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(20)])
    cfg = CompileConfig(holdout_samples=4)
    compile_model(model, calib, tmp_path / "one.onnx", cfg, measure=False)
    one = (tmp_path / "one.onnx").read_bytes()
    for workers in (2, 3):
        out = tmp_path / f"ray{workers}.onnx"
        res = compile_model(model, calib, out, CompileConfig(holdout_samples=4, ray_address=cluster,
                                                             ray_workers=workers), measure=False)
        assert res.cwac is not None and res.cwac.layers
        assert out.read_bytes() == one, (name, workers)


def _tiny(tmp_path):
    onnx.save(conv_net(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(12)]
    calib = _npz(tmp_path / "c.npz", feeds)
    cfg = CompileConfig(quant=QuantConfig(wbits=4), cwac=CwacConfig(enabled=False), holdout_samples=0)
    res = compile_model(tmp_path / "m.onnx", feeds, tmp_path / "q.onnx", cfg, measure=False)
    data = CalibrationSet(lambda: iter(feeds), InputSpec.from_model(res.float_model), "test", len(feeds))
    return res, calib, data


def _kill_first_worker_after_stage_one(pool, workers, calls):
    if calls == 1:
        os.kill(ray.get(workers[0].pid.remote()), signal.SIGKILL)


@pytest.mark.slow
def test_a_worker_killed_during_the_fit_is_replaced_and_the_fit_is_unchanged(cluster, tmp_path):
    from qwt2_onnx.cwac.fit import fit_compensations
    from qwt2_onnx.ray_shards import RayShards

    res, calib, data = _tiny(tmp_path)
    cfg = CwacConfig(target="global")
    one = fit_compensations(res.float_model, res.plain_model, res.plan, data, cfg)
    assert one.compensations
    pool = RayShards(cluster, 2, calib, data.specs, data.length, after_call=_kill_first_worker_after_stage_one)
    many = fit_compensations(res.float_model, res.plain_model, res.plan, data, cfg, shards=pool)
    assert pool.replacements == 1
    assert set(many.compensations) == set(one.compensations)
    for name, c in one.compensations.items():
        assert many.compensations[name].gain.tobytes() == c.gain.tobytes()
        assert many.compensations[name].bias.tobytes() == c.bias.tobytes()
    assert all(m["received_bytes"] > 0 for m in pool.moved)


@pytest.mark.slow
def test_without_retries_a_dead_worker_fails_the_fit_cleanly(cluster, tmp_path):
    from qwt2_onnx.cwac.fit import fit_compensations
    from qwt2_onnx.ray_shards import RayShards

    res, calib, data = _tiny(tmp_path)
    pool = RayShards(cluster, 2, calib, data.specs, data.length, retries=0,
                     after_call=_kill_first_worker_after_stage_one)
    with pytest.raises(QwtError, match="died"):
        fit_compensations(res.float_model, res.plain_model, res.plan, data, CwacConfig(target="global"), shards=pool)


def test_ray_is_not_imported_without_the_option(tmp_path):
    onnx.save(conv_net(), tmp_path / "m.onnx")
    code = ("import sys, numpy as np; from qwt2_onnx import compile_model, CompileConfig\n"
            "feeds = [{'x': np.ones((1, 3, 8, 8), np.float32) * i} for i in range(8)]\n"
            f"compile_model({str(tmp_path / 'm.onnx')!r}, feeds, {str(tmp_path / 'q.onnx')!r}, CompileConfig(), measure=False)\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_ray_needs_the_calibration_data_as_a_path(tmp_path):
    onnx.save(conv_net(), tmp_path / "m.onnx")
    feeds = [{"x": np.ones((1, 3, 8, 8), np.float32)} for _ in range(8)]
    with pytest.raises(QwtError, match="path every node"):
        compile_model(tmp_path / "m.onnx", feeds, tmp_path / "q.onnx", CompileConfig(ray_address="127.0.0.1:1"))
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
def test_an_image_folder_compiled_over_the_cluster_is_byte_identical(cluster, tmp_path):
    """The workers read the images themselves, with the driver's preprocessing."""
    from PIL import Image

    from qwt2_onnx.calib_data import ImagePreprocess

    onnx.save(conv_net(), tmp_path / "m.onnx")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    pre = ImagePreprocess((8, 8), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    compile_model(tmp_path / "m.onnx", folder, tmp_path / "one.onnx", CompileConfig(holdout_samples=0),
                  image_preprocess=pre, measure=False)
    compile_model(tmp_path / "m.onnx", folder, tmp_path / "ray.onnx",
                  CompileConfig(holdout_samples=0, ray_address=cluster, ray_workers=3), image_preprocess=pre,
                  measure=False)
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "one.onnx").read_bytes()


@pytest.mark.slow
def test_a_compile_whose_worker_is_killed_writes_the_same_model(cluster, tmp_path, monkeypatch):
    """Through compile_model: one shard worker's process is killed after the first stage of the fit; the
    written model is the one process's, byte for byte."""
    import qwt2_onnx.pipeline as pipeline
    from qwt2_onnx.ray_shards import RayShards

    onnx.save(conv_net(), tmp_path / "m.onnx")
    rng = np.random.default_rng(2)
    calib = _npz(tmp_path / "c.npz", [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(12)])
    compile_model(tmp_path / "m.onnx", calib, tmp_path / "one.onnx", CompileConfig(holdout_samples=0), measure=False)
    pools = []

    def killing_pool(config, source, calib_part, shard_progress=None, pre=None):
        pools.append(RayShards(config.ray_address, config.ray_workers, source, calib_part.specs, calib_part.length,
                               after_call=_kill_first_worker_after_stage_one))
        return pools[-1]

    monkeypatch.setattr(pipeline, "fit_shards", killing_pool)
    compile_model(tmp_path / "m.onnx", calib, tmp_path / "ray.onnx",
                  CompileConfig(holdout_samples=0, ray_address=cluster, ray_workers=2), measure=False)
    assert pools and all(p.replacements == 1 for p in pools)  # one kill per candidate target's fit
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "one.onnx").read_bytes()


@pytest.mark.slow
def test_a_worker_that_cannot_read_its_data_fails_with_the_reason(cluster, tmp_path):
    """A path the workers' node cannot read (not shared): the worker's own QwtError (exit 2), not a bug and
    not a dead actor retried."""
    from qwt2_onnx.cwac.fit import fit_compensations
    from qwt2_onnx.ray_shards import RayShards

    res, _, data = _tiny(tmp_path)
    pool = RayShards(cluster, 2, tmp_path / "not_shared.npz", data.specs, data.length)
    with pytest.raises(QwtError) as info:
        fit_compensations(res.float_model, res.plain_model, res.plan, data, CwacConfig(target="global"), shards=pool)
    assert "not_shared.npz" in str(info.value) and "died" not in str(info.value)
    assert type(info.value) is QwtError and pool.replacements == 0
