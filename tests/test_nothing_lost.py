"""Nothing lost, ever (issue 21): one test per class of the adversarial probe, on tiny models built in code.

Every refusal follows ``compile_fails_cleanly``'s contract (test_robustness.py): exit 2, the message naming
the problem, a ``Fix:`` line, no traceback, the input byte-identical, nothing left behind (TMPDIR included).
docs/ROBUSTNESS.md lists the classes and what each now does.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qwt2_onnx.cli import main
from test_robustness import _digest, _tree, compile_fails_cleanly
from tiny_models import calib_npz, conv_net, matmul_add


def _net(workdir: Path, name: str = "m.onnx") -> Path:
    onnx.save(conv_net(), workdir / name)
    return workdir / name


def fails_cleanly(workdir: Path, argv: list, message: str, inputs: list[Path] = (), exit_code: int = 2) -> str:
    """Any command: ``compile_fails_cleanly``'s contract for commands other than compile."""
    before_tree, before = _tree(workdir), {p: _digest(p) for p in inputs}
    res = CliRunner().invoke(main, [str(a) for a in argv])
    assert res.exit_code == exit_code, res.output
    assert "Traceback" not in res.output and message in res.output and "Fix:" in res.output, res.output
    assert {p: _digest(p) for p in inputs} == before
    assert _tree(workdir) == before_tree, _tree(workdir) - before_tree
    return res.output


# --- 1. an output never overwrites an input ----------------------------------------------------------------------

def _external(workdir: Path, name: str, location: str) -> Path:
    onnx.save(matmul_add(64, 32), workdir / name, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return workdir / name


def _wide(workdir: Path) -> Path:
    np.savez(workdir / "w.npz", x=np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32))
    return workdir / "w.npz"


def test_output_onto_the_inputs_own_external_data(workdir):
    model = _external(workdir, "m.onnx", "m.onnx.data")
    data = workdir / "m.onnx.data"
    before = _digest(data)
    compile_fails_cleanly(workdir, model, "--calib", _wide(workdir), "-o", data,
                          message="would overwrite the external data of input model")
    assert _digest(data) == before


def test_output_whose_data_file_is_the_inputs_external_data(workdir):
    model = _external(workdir, "m.onnx", "o.onnx.data")  # the input keeps its weights in o.onnx.data
    before = _digest(workdir / "o.onnx.data")
    compile_fails_cleanly(workdir, model, "--calib", _wide(workdir), "-o", workdir / "o.onnx",
                          message="output model's external data would overwrite the external data of input model")
    assert _digest(workdir / "o.onnx.data") == before


@pytest.mark.parametrize("which", ["unfused_is_input", "output_is_calib", "unfused_is_output", "report_is_input",
                                   "hard_link", "symlink", "params", "act_ranges", "calib_folder_file"])
def test_every_write_against_every_read(workdir, which):
    model, calib = _net(workdir), calib_npz(workdir / "c.npz")
    args = ["--calib", calib, "-o", workdir / "o.onnx"]
    message = "would overwrite"
    if which == "unfused_is_input":
        args += ["--emit-unfused", model]
    elif which == "output_is_calib":
        args = ["--calib", calib, "-o", calib]
    elif which == "unfused_is_output":
        args += ["--emit-unfused", workdir / "o.onnx"]
        message = "are the same file"
    elif which == "report_is_input":  # o.report.json is where the JSON report of -o o.onnx goes
        calib = calib_npz(workdir / "o.report.json")
        args = ["--calib", calib, "-o", workdir / "o.onnx"]
    elif which == "hard_link":
        os.link(calib, workdir / "h.onnx")
        args = ["--calib", calib, "-o", workdir / "h.onnx"]
    elif which == "symlink":
        os.symlink(model, workdir / "s.onnx")
        args = ["--calib", calib, "-o", workdir / "s.onnx"]
    elif which == "params":
        np.savez(workdir / "p.npz", **{"w1:gain": np.ones(8)})
        args = ["--calib", calib, "-o", workdir / "p.npz", "--cwac-params", workdir / "p.npz"]
    elif which == "act_ranges":
        np.savez(workdir / "r.npz", **{"w1:input_range": np.array([-1.0, 1.0])})
        args = ["--calib", calib, "-o", workdir / "r.npz", "--act-ranges", workdir / "r.npz"]
    elif which == "calib_folder_file":
        (workdir / "cal").mkdir()
        np.save(workdir / "cal" / "a.npy", np.zeros((4, 3, 8, 8), np.float32))
        args = ["--calib", workdir / "cal", "-o", workdir / "cal" / "a.npy"]
    inputs = [p for p in workdir.rglob("*") if p.is_file() and not p.is_symlink()]
    before = {p: _digest(p) for p in inputs}
    compile_fails_cleanly(workdir, model, *args, message=message)
    assert {p: _digest(p) for p in inputs} == before


def test_upgrade_mode_float_model_is_never_overwritten(workdir):
    fmodel = _net(workdir, "f.onnx")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": np.ones((1, 3, 8, 8), np.float32)}])

        def get_next(self):
            return next(self.it, None)
    quantize_static(str(fmodel), str(workdir / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    compile_fails_cleanly(workdir, workdir / "q.onnx", "--float-model", fmodel, "--calib",
                          calib_npz(workdir / "c.npz"), "-o", fmodel, message="would overwrite the float model")


# --- 2. all or nothing, checked up front ------------------------------------------------------------------------

@pytest.mark.parametrize("dest", ["existing_dir", "new_dir_slash", "fifo", "device_link", "unfused_missing_dir",
                                  "read_only_file"])
def test_destinations_refused_before_any_work(workdir, monkeypatch, dest):
    model, calib = _net(workdir), calib_npz(workdir / "c.npz")
    out, extra, message = workdir / "o.onnx", [], None
    if dest == "existing_dir":
        (workdir / "d").mkdir()
        out, message = workdir / "d", "names a folder"
    elif dest == "new_dir_slash":
        out, message = str(workdir / "newdir") + "/", "names a folder"
    elif dest == "fifo":
        os.mkfifo(workdir / "f.onnx")
        out, message = workdir / "f.onnx", "is a FIFO"
    elif dest == "device_link":  # a link to /dev/null: refused (were it not, only the link would be replaced)
        os.symlink("/dev/null", workdir / "n.onnx")
        out, message = workdir / "n.onnx", "is a device"
    elif dest == "unfused_missing_dir":
        extra, message = ["--emit-unfused", workdir / "nope" / "u.onnx"], "output directory does not exist"
    elif dest == "read_only_file":
        out.write_bytes(b"an earlier model")
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == out and mode & os.W_OK
                            else real(p, mode, **k))
        message = "cannot be replaced"
    import qwt2_onnx.pipeline as pipeline

    def never(*a, **k):
        raise AssertionError("the refusal must come before normalization")
    monkeypatch.setattr(pipeline, "NormalizePass", never)
    compile_fails_cleanly(workdir, model, "--calib", calib, "-o", out, *extra, message=message)
    assert not (workdir / "newdir").exists()


def test_a_name_the_file_system_cannot_hold_is_refused_before_work(workdir):
    """The report's name extends the model's: 250 bytes + '.report.html' is over the usual 255."""
    compile_fails_cleanly(workdir, _net(workdir), "--calib", calib_npz(workdir / "c.npz"), "-o",
                          workdir / ("m" * 245 + ".onnx"), message="this file system allows")


@pytest.mark.parametrize("option", ["--cwac-params", "--act-ranges"])
def test_parameter_files_are_read_safely_and_before_calibration(workdir, option):
    os.mkfifo(workdir / "p.npz")
    compile_fails_cleanly(workdir, _net(workdir), "--calib", calib_npz(workdir / "c.npz"), "-o", workdir / "o.onnx",
                          option, workdir / "p.npz", message="is not a regular file")
    os.remove(workdir / "p.npz")
    _npz_with_header(workdir / "p.npz", (10**6, 10**3))  # 4 GB declared in a few bytes
    compile_fails_cleanly(workdir, _net(workdir), "--calib", calib_npz(workdir / "c.npz"), "-o", workdir / "o.onnx",
                          option, workdir / "p.npz", message="declares shape")


def test_commit_places_every_output_or_none(workdir, monkeypatch):
    """The third rename fails: the two outputs already placed are taken back and the earlier model restored."""
    model, calib = _net(workdir), calib_npz(workdir / "c.npz")
    (workdir / "o.onnx").write_bytes(b"the previous model")
    real, calls = os.replace, []

    def flaky(src, dst):
        if ".qwt2-staging-" in str(src) and ".previous-" not in str(dst) and ".previous-" not in str(src):
            calls.append(dst)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", flaky)
    out = compile_fails_cleanly(workdir, model, "--calib", calib, "-o", workdir / "o.onnx", message="could not write")
    assert len(calls) == 3 and "nothing was written" in out
    assert (workdir / "o.onnx").read_bytes() == b"the previous model"


# --- 3. signals -----------------------------------------------------------------------------------------------

def _popen(workdir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(workdir / "tmpdir"), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "qwt2_onnx.entry", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)


def _wait_for(proc: subprocess.Popen, marker: str) -> str:
    """Read stderr until a line holds ``marker`` (an observed stage, no wall-clock assumption)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"the run ended before {marker!r}:\n{''.join(seen)}")


def _left_behind(workdir: Path, before: set[str]) -> set[str]:
    ort_session_id = str(workdir / "tmpdir" / ".ses")  # importing onnxruntime writes this id file to TMPDIR
    return _tree(workdir) - {ort_session_id} - before


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_signal_during_the_cwac_fit_cleans_up(workdir, sig, code):
    """SIGTERM / SIGINT while the CWAC fit holds its stage caches on disk (--cwac-cache-mib 0) and calibration
    has finished: exit 128 + signal, no output, no staging folder, no temporary file."""
    model = _net(workdir)
    np.savez(workdir / "big.npz", x=np.random.default_rng(0).normal(size=(3000, 3, 8, 8)).astype(np.float32))
    before = _tree(workdir)
    proc = _popen(workdir, "-v", "compile", str(model), "--calib", str(workdir / "big.npz"), "-o",
                  str(workdir / "o.onnx"), "--cwac-cache-mib", "0", "--batch-size", "1")
    _wait_for(proc, "stage calibrate")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "interrupted: nothing was written" in err and "Traceback" not in err, err
    assert _left_behind(workdir, before) == set()


@pytest.mark.slow
def test_signal_during_start_up_exits_cleanly(workdir):
    """SIGINT as soon as the entry point has installed its handlers (observed: SIGTERM is caught in
    /proc/PID/status), while numpy / onnx / onnxruntime are still importing: exit 130, no traceback."""
    before = _tree(workdir)
    proc = _popen(workdir, "compile", "--random-calib", "4")
    sigterm_bit = 1 << (signal.SIGTERM - 1)
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            break
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & sigterm_bit:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not [p for p in _left_behind(workdir, before) if not p.endswith((".onnx", ".json", ".html"))]


def test_interrupt_after_the_write_says_what_was_written(workdir, monkeypatch):
    import qwt2_onnx.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "fusion_report", interrupted)  # the stage after the write
    model, calib = _net(workdir), calib_npz(workdir / "c.npz")
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib), "-o", str(workdir / "o.onnx")])
    assert res.exit_code == 130
    assert "interrupted after writing" in res.output and str(workdir / "o.onnx") in res.output
    assert "nothing was written" not in res.output and (workdir / "o.onnx").is_file()


def test_out_of_memory_is_exit_2_and_nothing_written(workdir, monkeypatch):
    import qwt2_onnx.distributed as distributed  # where the calibrate stage calls collect_ranges

    def exhausted(*a, **k):
        raise MemoryError
    monkeypatch.setattr(distributed, "collect_ranges", exhausted)
    compile_fails_cleanly(workdir, _net(workdir), "--calib", calib_npz(workdir / "c.npz"), "-o", workdir / "o.onnx",
                          message="ran out of memory")


def test_stale_folders_of_dead_runs_are_removed(workdir):
    """A run killed with SIGKILL leaves its staging folder and stage caches; the next run removes them (their
    pid is not running), and leaves those of a live run alone."""
    dead, live = 2**22 + 12345, os.getpid()  # above pid_max's default: never a running process
    stale = [workdir / f".qwt2-staging-{dead}-abc", workdir / "tmpdir" / f"qwt2_segments_{dead}-xyz"]
    alive = [workdir / f".qwt2-staging-{live}-abc", workdir / "tmpdir" / f"qwt2_segments_{live}-xyz"]
    for d in stale + alive:
        d.mkdir()
        (d / "0_0.npy").write_bytes(b"x")
    model, calib = _net(workdir), calib_npz(workdir / "c.npz")
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib), "-o", str(workdir / "o.onnx")])
    assert res.exit_code == 0, res.output
    assert not any(d.exists() for d in stale) and all(d.exists() for d in alive)


# --- 4. hostile data: headers checked before data is read --------------------------------------------------------

def _npz_with_header(path: Path, shape, payload: bytes = b"") -> Path:
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", buf.getvalue() + payload)
    return path


@pytest.mark.parametrize("case, message", [
    ("lying_count", "declares shape [1000, 3, 8, 8]"),
    ("huge_sample", "declares shape [1, 3, 40000, 40000]"),
    ("negative", "invalid shape"),
    ("fifo", "is not a regular file"),
    ("dev_zero", "is not a regular file"),
])
def test_hostile_calibration_files(workdir, case, message):
    model = _net(workdir)
    calib = workdir / "c.npz"
    if case == "lying_count":
        _npz_with_header(calib, (1000, 3, 8, 8), b"\0" * 4 * 3 * 8 * 8)
    elif case == "huge_sample":  # a 3.8 GB sample declared in a few bytes
        _npz_with_header(calib, (1, 3, 40000, 40000))
    elif case == "negative":
        _npz_with_header(calib, (-1, 3, 8, 8))
    elif case == "fifo":
        os.mkfifo(calib)
    elif case == "dev_zero":
        os.symlink("/dev/zero", calib)
    compile_fails_cleanly(workdir, model, "--calib", calib, "-o", workdir / "o.onnx", message=message)


def test_a_sample_too_big_to_allocate_is_refused_before_reading(workdir, monkeypatch):
    """A dynamic-shape model takes any sample size, so the bound is on bytes: checked from the header."""
    import qwt2_onnx.calib_data as calib_data

    monkeypatch.setattr(calib_data, "MAX_SAMPLE_BYTES", 4 * 3 * 16 * 16 - 1)
    onnx.save(conv_net(hw="H"), workdir / "m.onnx")
    calib = calib_npz(workdir / "c.npz", n=4, shape=(3, 16, 16))
    compile_fails_cleanly(workdir, workdir / "m.onnx", "--calib", calib, "-o", workdir / "o.onnx",
                          message="one calibration sample of")


def test_a_sample_shape_the_fixed_model_cannot_take_is_refused_from_the_header(workdir):
    compile_fails_cleanly(workdir, _net(workdir), "--calib", calib_npz(workdir / "c.npz", shape=(3, 9, 9)),
                          "-o", workdir / "o.onnx", message="axis 2: expected 8, got 9")


# --- 5. every option validated at parse time ----------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--percentile", "150"], "--percentile 150.0 is out of range"),
    (["--percentile", "nan"], "--percentile nan is out of range"),
    (["--percentile", "0"], "--percentile 0.0 is out of range"),
    (["--percentile", "-5"], "--percentile -5.0 is out of range"),
    (["--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--batch-size", "-3"], "--batch-size -3 is out of range"),
    (["--max-samples", "0"], "--max-samples 0 is out of range"),
    (["--cwac-lambda", "nan"], "--cwac-lambda nan is out of range"),
    (["--cwac-lambda", "-1"], "--cwac-lambda -1.0 is out of range"),
    (["--cwac-lambda", "inf"], "--cwac-lambda inf is out of range"),
    (["--exclude", "re:["], "is not a valid regular expression"),
    (["--random-calib", "0"], "at least one sample"),
    (["--external-data-above", "-1"], "--external-data-above -1 is out of range"),
])
def test_bad_option_values(workdir, args, message):
    argv = ["--calib", calib_npz(workdir / "c.npz"), "-o", workdir / "o.onnx", *args]
    if "--random-calib" in args:
        argv = argv[2:]
    compile_fails_cleanly(workdir, _net(workdir), *argv, message=message)


@pytest.mark.parametrize("args, message", [
    (["--image-size", "0,0"], "--image-size '0,0'"),
    (["--image-size", "-8,8"], "--image-size '-8,8'"),
    (["--image-size", "8.7,8.2"], "--image-size '8.7,8.2'"),
    (["--image-size", "8,8", "--mean", "0.5,0.5"], "--mean"),
    (["--image-size", "8,8", "--std", "0,1,1"], "--std"),
    (["--image-size", "8,8", "--scale", "nan"], "--scale"),
    (["--image-size", "100000,100000"], "one image would take over"),
])
def test_bad_image_options(workdir, args, message):
    from PIL import Image

    (workdir / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(workdir / "imgs" / "a.png")
    compile_fails_cleanly(workdir, _net(workdir), "--calib", workdir / "imgs", "-o", workdir / "o.onnx", *args,
                          message=message)


@pytest.mark.parametrize("shape", ["nan", "1,-4", "1,3.5", ""])
def test_export_shape_is_checked(workdir, shape):
    fails_cleanly(workdir, ["export", "tiny_models:conv_net", "--shape", shape, "-o", workdir / "e.onnx"],
                  message="--shape")


def test_options_without_effect_warn(workdir):
    model, calib = _net(workdir), calib_npz(workdir / "c.npz")
    np.savez(workdir / "p.npz", **{"w1:gain": np.ones(8)})
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib), "-o", str(workdir / "o.onnx"),
                                    "--no-cwac", "--cwac-params", str(workdir / "p.npz"), "--image-size", "8,8",
                                    "--mean", "0.5,0.5,0.5", "--calib-method", "minmax", "--percentile", "99"])
    assert res.exit_code == 0, res.output
    assert "--cwac-params has no effect with --no-cwac" in res.output
    assert "--image-size / --mean have no effect unless --calib is a folder of images" in res.output
    assert "--percentile has no effect unless --calib-method percentile" in res.output


def _diff(workdir: Path, ref: Path, cand: Path, *args, message: str, data: Path | None = None) -> str:
    data = data or calib_npz(workdir / "d.npz", n=8)
    return fails_cleanly(workdir, ["diff", ref, cand, "--data", data, *args], message=message, inputs=[ref, cand])


def test_diff_refuses_models_with_different_interfaces(workdir):
    a = _net(workdir, "a.onnx")
    other = conv_net()
    other.graph.input[0].name = "image"
    for node in other.graph.node:
        node.input[:] = ["image" if n == "x" else n for n in node.input]
    onnx.save(other, workdir / "b.onnx")
    _diff(workdir, a, workdir / "b.onnx", message="do not have the same interface")
    onnx.save(conv_net(hw=16), workdir / "c.onnx")
    out = _diff(workdir, a, workdir / "c.onnx", message="do not have the same interface")
    assert "[N, 3, 16, 16]" in out


@pytest.mark.parametrize("args, message", [
    (["--output-part", "p=y:axis=1:3:3"], "is empty"),
    (["--output-part", "p=y:axis=5:0:2"], "does not fit output 'y'"),
    (["--output-part", "p=y:axis=1:0:9"], "does not fit output 'y'"),
    (["--rtol", "nan"], "a tolerance must be a finite number"),
    (["--atol", "-1"], "a tolerance must be a finite number"),
    (["--batch-size", "0"], "--batch-size 0 is out of range"),
])
def test_diff_options(workdir, args, message):
    a = _net(workdir, "a.onnx")
    _diff(workdir, a, a, *args, message=message)


def test_diff_report_into_a_file_or_over_an_input(workdir):
    a = _net(workdir, "a.onnx")
    (workdir / "afile").write_text("not a folder")
    _diff(workdir, a, a, "--report", workdir / "afile", message="is not a folder")
    (workdir / "rep").mkdir()
    data = calib_npz(workdir / "rep" / "report.json", n=8)  # the data sits where the report would go
    _diff(workdir, a, a, "--report", workdir / "rep", message="would overwrite", data=data)


# --- 6. valid but wrong data is called out ---------------------------------------------------------------------

def test_sixteen_bit_png_is_scaled_not_saturated(workdir):
    from PIL import Image

    from qwt2_onnx.calib_data import ImagePreprocess, InputSpec, open_calibration

    (workdir / "imgs").mkdir()
    gray = np.full((8, 8), 32768, np.uint16)  # half of full scale in 16 bits
    Image.fromarray(gray).save(workdir / "imgs" / "a.png")
    specs = InputSpec.from_model(conv_net())
    (feed,) = list(open_calibration(workdir / "imgs", specs, ImagePreprocess((8, 8))))
    np.testing.assert_allclose(feed["x"], 32768 / 65535, rtol=1e-5)


@pytest.mark.parametrize("content, message", [(b"\x89PNG\r\n\x1a\n not really", "cannot read image"),
                                              (b"plain text", "cannot read image")])
def test_corrupt_image_is_named(workdir, content, message):
    (workdir / "imgs").mkdir()
    (workdir / "imgs" / "broken.png").write_bytes(content)
    out = compile_fails_cleanly(workdir, _net(workdir), "--calib", workdir / "imgs", "--image-size", "8,8", "-o",
                                workdir / "o.onnx", message=message)
    assert "broken.png" in out


def test_decompression_bomb_is_refused(workdir, monkeypatch):
    from PIL import Image

    (workdir / "imgs").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(workdir / "imgs" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 pixels counts as a bomb now
    compile_fails_cleanly(workdir, _net(workdir), "--calib", workdir / "imgs", "--image-size", "8,8", "-o",
                          workdir / "o.onnx", message="too large to decode safely")


def test_object_array_in_a_npy_folder(workdir):
    (workdir / "cal").mkdir()
    np.save(workdir / "cal" / "a.npy", np.array([{"pickled": 1}], dtype=object), allow_pickle=True)
    compile_fails_cleanly(workdir, _net(workdir), "--calib", workdir / "cal", "-o", workdir / "o.onnx",
                          message="holds Python objects")


def test_all_zero_data_and_too_few_samples_warn(workdir):
    model = _net(workdir)
    np.savez(workdir / "z.npz", x=np.zeros((40, 3, 8, 8), np.float32))
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(workdir / "z.npz"), "-o",
                                    str(workdir / "z.onnx")])
    assert res.exit_code == 0 and "is all zeros" in res.output, res.output
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib_npz(workdir / "c.npz", n=3)), "-o",
                                    str(workdir / "t.onnx")])
    assert res.exit_code == 0 and "CWAC not fitted: 3 calibration samples" in res.output, res.output
    assert "CWAC: target" not in res.output


def test_absurd_cwac_params_are_called_out(workdir):
    model, calib = _net(workdir), calib_npz(workdir / "c.npz")
    np.savez(workdir / "p.npz", **{"w1:gain": np.zeros(8), "wg:gain": np.full(16, 3.0)})
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib), "-o", str(workdir / "o.onnx"),
                                    "--cwac-params", str(workdir / "p.npz")])
    assert res.exit_code == 0, res.output
    assert "warning: the given compensation (--cwac-params) makes the model worse" in res.output


# --- 7. --batch-size is a memory knob: the same bytes whatever it is ------------------------------------------

def test_batch_size_does_not_change_the_model_or_the_data_hash(workdir):
    model, calib = _net(workdir), calib_npz(workdir / "c.npz", n=40)
    for b in (1, 8, 16):
        res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib), "-o", str(workdir / f"b{b}.onnx"),
                                        "--batch-size", str(b)])
        assert res.exit_code == 0, res.output
    assert len({(workdir / f"b{b}.onnx").read_bytes() for b in (1, 8, 16)}) == 1
    hashes = {json.loads((workdir / f"b{b}.report.json").read_text())["data"]["sha256"] for b in (1, 8, 16)}
    assert len(hashes) == 1
