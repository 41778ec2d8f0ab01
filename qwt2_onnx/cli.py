"""The ``qwt2-onnx`` command line: parse, build the config, call, render."""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import click

from .calib_data import ImagePreprocess, InputSpec, random_calibration
from .cli_bench import bench_cmd
from .cli_check import check_cmd, diff_cmd
from .config import CalibConfig, CompileConfig, CwacConfig, QuantConfig
from .errors import EXIT_INTERNAL, QwtError
from .model_io import load_model


def _floats(text: str | None, n: int | None = None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    if n and len(vals) != n:
        raise click.BadParameter(f"expected {n} numbers, got {len(vals)}")
    return vals


def _ints(text: str, what: str, n: int | None = None, minimum: int = 1) -> tuple[int, ...]:
    """Comma-separated whole numbers >= ``minimum`` (``8.7`` or ``nan`` is refused, never truncated)."""
    parts = text.split(",")
    if (n and len(parts) != n) or not all(p.strip().lstrip("-").isdigit() for p in parts) \
            or any(int(p) < minimum for p in parts):
        count = f"{n} " if n else ""
        example = "1,3,224,224" if what == "--shape" else ",".join(["224"] * (n or 2))
        raise QwtError(f"{what} {text!r}: expected {count}comma-separated whole numbers >= {minimum}",
                       fix=f"e.g. {what} {example}")
    return tuple(int(p) for p in parts)


def _file_path(text: str | None, option: str) -> Path | None:
    """An output file path as typed: ``newdir/`` names a folder, which a model cannot be written as."""
    if text is None:
        return None
    if not text or text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise QwtError(f"{option} {text!r} names a folder, not a file",
                       fix=f"pass a file path, e.g. {option} {text.rstrip('/' + os.sep) or '.'}/model.int8.onnx")
    return Path(text)


def _default_output(model: Path, qcfg: QuantConfig, here: bool) -> Path:
    tag = f"w{qcfg.wbits}a{qcfg.abits}" if (qcfg.wbits, qcfg.abits) != (8, 8) else "int8"
    name = f"{model.stem}.{tag}.{qcfg.target}.onnx"
    return Path(name) if here else model.with_name(name)


class _Main(click.Group):
    """The exit codes are an API (README, "Exit codes"): every command runs inside this one handler."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except QwtError as e:
            _fail(e)
        except OSError as e:  # the file system refused a path the user gave (a name too long, no permission, EIO)
            where = f" {e.filename}" if e.filename else ""
            _fail(QwtError(f"cannot access{where}: {e.strerror or e}", notes=[f"errno {e.errno}"],
                           fix="check the path, its permissions and the disk; nothing was written"))
        except MemoryError:
            _fail(QwtError("ran out of memory", notes=["nothing was written"],
                           fix="pass --batch-size 1 and --cwac-cache-mib 0, or run on a machine with more memory"))
        except KeyboardInterrupt as e:  # Ctrl-C, or errors.Interrupted from SIGINT / SIGTERM / SIGHUP (entry.py)
            _interrupted(getattr(e, "exit_code", 130))
        except Exception:  # noqa: BLE001  (our bug: say so, keep the traceback)
            click.secho("internal error: this is a bug in qwt2-onnx, not in your model or data; please report it "
                        "with the traceback below", fg="red", err=True)
            traceback.print_exc()
            sys.exit(EXIT_INTERNAL)


@click.group(cls=_Main)
@click.option("-v", "--verbose", count=True, help="-v: one line per stage; -vv: per node.")
def main(verbose: int) -> None:
    """qwt2-onnx: float ONNX -> deployable int8 QDQ ONNX.

    Exit codes: 0 success, 1 the equivalence check failed, 2 bad model / data / option, 130 / 143
    interrupted (SIGINT / SIGTERM), 3 internal error (a bug: please report it)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("compile")
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--calib", "calib", type=click.Path(path_type=Path), help=".npz, or a folder of .npy/.npz/images.")
@click.option("--random-calib", type=int, default=None, metavar="N", help="Calibrate on N random samples (bad idea).")
@click.option("-o", "--output", help="Output model [MODEL.int8.<target>.onnx].")
@click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--act-type", type=click.Choice(["u8", "s8"]), default=None, help="[ort: u8, trt: s8]")
@click.option("--wbits", type=click.Choice(["8", "6", "4"]), default="8", show_default=True)
@click.option("--abits", type=click.Choice(["8", "6"]), default="8", show_default=True,
              help="Activation bits (6: simulated in an 8-bit container).")
@click.option("--full-range-weights", is_flag=True,
              help="ort: use the full [-127,127] weight range (only safe on CPUs with VNNI/AVX512-VNNI).")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="percentile", show_default=True)
@click.option("--percentile", type=float, default=99.99, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Samples per onnxruntime run, at most: fewer where one batch's fetched tensors would exceed "
                   "64 MiB (measured on the first sample).")
@click.option("--max-samples", type=int, default=None)
@click.option("--exclude", multiple=True, help="Node name, glob, or re:REGEX to keep in float (repeatable).")
@click.option("--exclude-op", multiple=True, help="Op type to keep in float (repeatable).")
@click.option("--float-model", type=click.Path(path_type=Path), default=None,
              help="Upgrade mode: MODEL is already QDQ-quantized (e.g. by onnxruntime); this is its float original.")
@click.option("--cwac-params", type=click.Path(path_type=Path), default=None,
              help="Fold compensation fitted elsewhere: .npz of '<weight>:gain' / '<weight>:bias' arrays.")
@click.option("--act-ranges", type=click.Path(path_type=Path), default=None,
              help="Activation ranges given from outside: .npz of '<weight>:input_range' / ':output_range' [lo, hi].")
@click.option("--no-cwac", is_flag=True, help="Plain PTQ: no QwT-v2 compensation.")
@click.option("--cwac-target", type=click.Choice(["auto", "global", "local"]), default="auto", show_default=True,
              help="CWAC fit target; auto fits both and keeps the one with the lower held-out output error "
                   "(never one whose Softmax argmax agrees with float less often than no compensation's).")
@click.option("--cwac-head-fit", type=click.Choice(["spread", "lsq"]), default="spread", show_default=True,
              help="Score heads (layers whose output is the logits of a Sigmoid graph output): keep the float "
                   "logits' spread, or fit by least squares like every other layer (which shrinks them "
                   "toward the background).")
@click.option("--cwac-position-mask", default=None, metavar="INPUT",
              help="A [batch, seq] attention-mask input (nonzero = a real token): CWAC's statistics and gates "
                   "count only real positions of per-token tensors ([batch, seq, ..., channels] or "
                   "[batch·seq, ..., channels]), not padding.")
@click.option("--cwac-lambda", type=float, default=0.0, show_default=True, help="Shrink CWAC gains toward 1.")
@click.option("--cwac-cache-mib", type=int, default=None, metavar="MIB",
              help="In-memory budget of each of the CWAC fit's two caches of stage-boundary tensors; beyond it "
                   "they go to a temporary folder [CwacConfig.cache_mib].")
@click.option("--emit-unfused", default=None,
              help="Also write the unfused graph (explicit CWAC Mul/Add ops) here.")
@click.option("--no-check", is_flag=True, help="Skip the equivalence check and its report (JSON + HTML beside OUT).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--external-data-above", type=int, default=None, metavar="BYTES",
              help="Write weights as external data (OUT.data) above this model size [2 GB, protobuf's limit; "
                   "always when the input has external data].")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Fit CWAC over shards of the calibration data on this Ray cluster ([ray] extra; --calib must be "
                   "a path every node can read).")
@click.option("--ray-workers", type=int, default=2, show_default=True, help="Shard workers for --ray (one CPU each).")
@click.option("--image-size", default=None, help="Image folders: H,W.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True)
@click.option("--mean", default="0,0,0", show_default=True)
@click.option("--std", default="1,1,1", show_default=True)
@click.option("--scale", type=float, default=1 / 255, show_default=True)
@click.option("--channel-order", type=click.Choice(["RGB", "BGR"]), default="RGB", show_default=True)
def compile_cmd(model, calib, random_calib, output, target, act_type, wbits, abits, full_range_weights,
                calib_method, percentile, batch_size, max_samples, exclude, exclude_op, float_model, cwac_params, act_ranges,
                no_cwac, cwac_target, cwac_head_fit, cwac_position_mask,
                cwac_lambda, cwac_cache_mib, emit_unfused, no_check, no_simplify, external_data_above,
                ray_address, ray_workers, image_size, layout, mean, std, scale, channel_order) -> None:
    """Compile MODEL (float ONNX) into a QDQ model.  Without MODEL: the embedded digits CNN."""
    from . import default_model
    from .pipeline import compile_model, upgrade_model
    from .render import render_summary

    output, emit_unfused = _file_path(output, "-o"), _file_path(emit_unfused, "--emit-unfused")
    demo = model is None
    if demo:
        click.echo(f"No MODEL given: compiling the embedded default ({default_model.model_path().name}, "
                   "a digits CNN) on its bundled calibration set.", err=True)
        model, calib = default_model.model_path(), calib or default_model.calib_path()
    qcfg = QuantConfig(target=target, wbits=int(wbits), abits=int(abits), act_type=act_type,
                       avx2_safe_weights=not full_range_weights,
                       exclude_names=tuple(exclude), exclude_op_types=tuple(exclude_op))
    config = CompileConfig(quant=qcfg, calib=CalibConfig(calib_method, percentile, batch_size, max_samples,
                                                                str(act_ranges) if act_ranges else None),
                           cwac=CwacConfig(enabled=not no_cwac, target=cwac_target, head_fit=cwac_head_fit,
                                           lam=cwac_lambda, params=str(cwac_params) if cwac_params else None,
                                           position_mask=cwac_position_mask,
                                           **({} if cwac_cache_mib is None else {"cache_mib": cwac_cache_mib})),
                           simplify=not no_simplify, check=not no_check,
                           external_data_above=external_data_above, ray_address=ray_address, ray_workers=ray_workers)
    _warn_no_effect(no_cwac, calib_method, calib, image_size)
    if random_calib is not None and random_calib < 1:
        raise QwtError(f"--random-calib {random_calib}: at least one sample is needed", fix="e.g. --random-calib 32")
    pre = None
    if image_size:
        h, w = _ints(image_size, "--image-size", 2)
        pre = ImagePreprocess((h, w), layout, _floats(mean), _floats(std), scale, channel_order)
    if calib is None and random_calib is None:
        raise QwtError("no calibration data", fix="pass --calib DATA (or, for a smoke test only, --random-calib N)")
    if random_calib is not None:
        if calib is not None:
            raise QwtError("--calib and --random-calib are mutually exclusive", fix="pass only one of them")
        click.secho(f"WARNING: calibrating on {random_calib} RANDOM samples: the ranges will not match real "
                    "data and accuracy will suffer. Use --calib with real data for a model you deploy.",
                    fg="red", bold=True, err=True)
        calib = random_calibration(InputSpec.from_model(load_model(model)), random_calib)
    if float_model is not None and output is None:
        output = model.with_name(f"{model.stem}.cwac.onnx")
    output = output or _default_output(model, qcfg, here=demo)
    with _Progress("calibrating" if ray_address is None else "shard calls (calibration, CWAC stages)") as progress:
        unfused = None if no_cwac else emit_unfused
        if float_model is not None:
            if no_cwac:
                raise QwtError("--float-model (upgrade mode) with --no-cwac would change nothing",
                               fix="drop --no-cwac, or compile the float model itself")
            result = upgrade_model(model, float_model, calib, output, config, image_preprocess=pre,
                                   unfused_path=unfused)
        else:
            result = compile_model(model, calib, output, config, image_preprocess=pre, progress=progress,
                                   unfused_path=unfused)
    click.echo(render_summary(result))
    if demo:
        click.echo(_demo_accuracy(result))


def _warn_no_effect(no_cwac: bool, calib_method: str, calib, image_size) -> None:
    """A warning for each option given explicitly that the other options make pointless."""
    ctx = click.get_current_context()
    given = {p.name for p in ctx.command.params
             if ctx.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT)}

    def no_effect(names: list[str], why: str) -> None:
        used = [f"--{n.replace('_', '-')}" for n in names if n in given]
        if used:
            click.echo(f"warning: {' / '.join(used)} {'has' if len(used) == 1 else 'have'} no effect {why}", err=True)

    if no_cwac:
        no_effect(["cwac_target", "cwac_head_fit", "cwac_position_mask", "cwac_lambda", "cwac_cache_mib",
                   "emit_unfused", "cwac_params"], "with --no-cwac")
    if calib_method != "percentile":
        no_effect(["percentile"], "unless --calib-method percentile")
    image_options = ["layout", "mean", "std", "scale", "channel_order"]
    if calib is None or not Path(calib).is_dir():
        no_effect(["image_size", *image_options], "unless --calib is a folder of images")
    elif not image_size:
        no_effect(image_options, "without --image-size")


def _interrupted(code: int = 130) -> None:
    """SIGINT / SIGTERM: every output is staged and removed unless all are complete; say truthfully what
    was written and exit 128 + the signal (130 SIGINT, 143 SIGTERM)."""
    from .model_io import written_paths

    done = written_paths()
    if done:
        click.secho(f"interrupted after writing {', '.join(map(str, done))} (complete)", fg="red", err=True)
    else:
        click.secho("interrupted: nothing was written", fg="red", err=True)
    sys.exit(code)


def _fail(e: QwtError) -> None:
    """Print a user error without a traceback; exit 1 for a failed check, 2 for anything else."""
    click.secho(f"error: {e}", fg="red", err=True)
    sys.exit(getattr(e, "exit_code", 2))


class _Progress:
    """A click progress bar created on the first update, when the total is known."""

    def __init__(self, label: str):
        self.label, self.bar, self.seen = label, None, 0

    def __call__(self, n: int, total: int | None) -> None:
        if total is None:  # a source of unknown length (a generator): a running count instead of a bar
            self.seen += n
            click.echo(f"\r{self.label}: {self.seen} samples", nl=False, err=True)
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_pos=True)
            self.bar.__enter__()
        self.bar.update(n)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif self.seen:
            click.echo("", err=True)


def _demo_accuracy(result) -> str:
    from .default_model import accuracy

    f = accuracy(result.float_model, optimized=True)
    s = accuracy(result.model, optimized=False)
    d = accuracy(result.model, optimized=True)
    line = f"digits test accuracy: float {f:.4f} | int8 simulated {s:.4f} | int8 deployed (onnxruntime) {d:.4f}"
    if result.cwac is not None and result.cwac.compensations:
        line += f" | plain PTQ (no CWAC) deployed {accuracy(result.plain_model, optimized=True):.4f}"
    return line


main.add_command(check_cmd)
main.add_command(diff_cmd)
main.add_command(bench_cmd)


@main.command("export")
@click.argument("factory")
@click.option("--shape", "shapes", multiple=True, required=True, help="Example input shape, e.g. 1,3,224,224 (one per input).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output .onnx path.")
@click.option("--input-name", "input_names", multiple=True, help="Input name (repeatable) [input / input_i].")
@click.option("--output-name", "output_names", multiple=True, help="Output name (repeatable) [output / output_i].")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--static-batch", is_flag=True, help="Keep the example batch size fixed (default: dynamic axis 0).")
def export_cmd(factory, shapes, output, input_names, output_names, opset, static_batch) -> None:
    """Export FACTORY (module:function or file.py:function returning a torch.nn.Module) to ONNX, parameter
    names kept as initializer names, checked against PyTorch on seeded random inputs of --shape."""
    import numpy as np

    from .torch_export import export, load_factory

    module = load_factory(factory)
    rng = np.random.default_rng(0)
    examples = tuple(rng.standard_normal(_ints(s, "--shape")).astype(np.float32) for s in shapes)
    result = export(module, examples, output, input_names=list(input_names) or None,
                    output_names=list(output_names) or None, opset=opset, dynamic_batch=not static_batch)
    click.echo(result.summary())
