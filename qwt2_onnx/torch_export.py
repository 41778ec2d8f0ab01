"""``export``: a PyTorch module to an ONNX model that ``compile`` can match by name, checked against PyTorch.

    module.eval() ─► torch.onnx.export (TorchScript exporter) ─► rename inputs/outputs ─► onnxruntime vs
    PyTorch on the example inputs (and at twice their batch) ─► atomic write

torch is imported here only, inside the functions: the core package never needs it (extra ``[torch]``).

Why these exporter settings (torch 2.13, measured):

* ``dynamo=False``: its initializers are the module's parameter names (``features.0.weight``), the key
  ``--cwac-params`` and ``--act-ranges`` match on.  The dynamo exporter (which also needs onnxscript)
  folds BatchNorm into the Conv while optimizing and names the folded bias ``val_16``.
* ``training=PRESERVE`` with the module in eval mode: the default EVAL export fuses BatchNorm into the
  Conv and renames the fused weight (``onnx::Conv_15``).  PRESERVE keeps an inference BatchNormalization,
  which ``compile`` folds into the Conv *keeping the Conv weight's name*.
* ``keep_initializers_as_inputs=True``: otherwise the exporter deduplicates equal initializers (a fresh
  BatchNorm's running_var equals its weight) into ``Identity`` nodes of one parameter, and the other name
  is lost.  The initializers are taken out of the graph inputs afterwards.
* Names: the exporter *silently renames* a clashing value: an output named like a parameter renames the
  parameter (``fc.weight`` -> ``fc.weight.1``), an output named like the input renames the input
  (``x`` -> ``x.1``), one named like an internal value gets ``.1`` itself (older versions wrote an
  invalid model with two producers of one name).  So inputs and outputs are exported under placeholder
  names and renamed afterwards: an internal value that holds a requested name is renamed out of the
  way; a requested name equal to a parameter name or to another input/output is refused.
* Dynamic batch: axis 0 of every input and output is ``batch``; the check runs the example inputs and
  the same inputs concatenated twice, so a batch size baked into the graph (e.g. ``x.view(1, -1)``) is
  caught at export, not at deployment.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx

from .errors import QwtError
from .model_io import check_output_dir, save_model_atomic

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
_PLACEHOLDER = "qwt2_onnx_export_{}_{}"


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    input_names: list[str]
    output_names: list[str]
    opset: int
    dynamic_batch: bool
    max_abs_error: dict[str, float]  # output -> max |ONNX - PyTorch| over the checked batches
    max_rel_error: dict[str, float]  # output -> max_abs_error / max |PyTorch output|
    checked_batches: list[int]
    parameters_kept: int  # parameters whose name is an initializer of the exported model
    parameters_missing: list[str]  # parameters the graph does not hold under their own name

    def summary(self) -> str:
        errs = ", ".join(f"{k} {v:.2g}" for k, v in self.max_abs_error.items())
        line = (f"wrote {self.path} | opset {self.opset} | batch {'dynamic' if self.dynamic_batch else 'fixed'} "
                f"(checked {', '.join(map(str, self.checked_batches))}) | max |ONNX - PyTorch|: {errs} | "
                f"{self.parameters_kept} parameter names kept")
        if self.parameters_missing:
            line += f", {len(self.parameters_missing)} not in the graph under their name: " + \
                ", ".join(self.parameters_missing[:5]) + (" ..." if len(self.parameters_missing) > 5 else "")
        return line


def export(module, example_inputs, path, *, input_names: list[str] | None = None,
           output_names: list[str] | None = None, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
           atol: float = 1e-4, rtol: float = 1e-4) -> ExportResult:
    """Export ``module`` (a ``torch.nn.Module``) on ``example_inputs`` (a tensor or a tuple of tensors) to
    ``path``; the model is written only if onnxruntime reproduces the PyTorch outputs within
    ``atol + rtol * max|output|`` (see module doc)."""
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise QwtError(f"export takes a torch.nn.Module, got {type(module).__name__}",
                       fix="pass the model object (e.g. torchvision.models.resnet18()), not its class or state_dict")
    inputs = _as_tensors(torch, example_inputs)
    path = Path(path)
    check_output_dir(path)
    input_names = list(input_names) if input_names else (["input"] if len(inputs) == 1 else
                                                          [f"input_{i}" for i in range(len(inputs))])
    was_training = module.training
    module.eval()
    try:
        reference = _forward(torch, module, inputs)
        output_names = list(output_names) if output_names else (["output"] if len(reference) == 1 else
                                                                [f"output_{i}" for i in range(len(reference))])
        _check_names(module, input_names, output_names, len(inputs), len(reference))
        model = _export(torch, module, inputs, len(reference), opset, dynamic_batch)
        _rename_interface(model, input_names, output_names)
        errors, batches = _check_outputs(torch, module, model, inputs, reference, dynamic_batch, atol, rtol)
    finally:
        module.train(was_training)
    inits = {t.name for t in model.graph.initializer}
    params = [name for name, _ in module.named_parameters()]
    missing = [p for p in params if p not in inits]
    save_model_atomic(model, path)
    result = ExportResult(path, input_names, output_names, opset, dynamic_batch,
                          {k: v[0] for k, v in errors.items()}, {k: v[1] for k, v in errors.items()},
                          batches, len(params) - len(missing), missing)
    logger.info("%s", result.summary())
    return result


def _torch():
    try:
        import torch
    except ImportError as e:
        raise QwtError("PyTorch is not installed", notes=[f"{type(e).__name__}: {e}"],
                       fix="pip install 'qwt2-onnx[torch]' (it pins torch==2.13.0, a CPU build is enough)") from None
    return torch


def _as_tensors(torch, example_inputs) -> tuple:
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    out = []
    for i, x in enumerate(items):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise QwtError(f"example input {i} is a {type(x).__name__}, not a tensor",
                           fix="pass a torch.Tensor (or numpy array), or a tuple of them, one per forward argument")
        if x.ndim == 0:
            raise QwtError(f"example input {i} is a scalar", notes=["axis 0 of every input is the batch axis"],
                           fix="give every input a batch axis, e.g. x.unsqueeze(0)")
        out.append(x)
    if not out:
        raise QwtError("no example inputs", fix="pass one example tensor per forward argument")
    return tuple(out)


def _forward(torch, module, inputs) -> list:
    try:
        with torch.no_grad():
            y = module(*inputs)
    except Exception as e:  # noqa: BLE001  (the user's forward: any error means the inputs do not fit)
        raise QwtError("the module fails on the example inputs",
                       notes=[f"input shapes: {[tuple(x.shape) for x in inputs]}", f"{type(e).__name__}: {str(e)[:300]}"],
                       fix="pass example inputs of the shapes and dtypes the module's forward expects") from None
    ys = list(y) if isinstance(y, (tuple, list)) else [y]
    if not ys or not all(isinstance(t, torch.Tensor) for t in ys):
        raise QwtError("the module's output is not a tensor or a tuple of tensors",
                       notes=[f"output type: {type(y).__name__}"],
                       fix="wrap the module so that forward returns a tensor or a tuple of tensors")
    return [t.detach().cpu().numpy() for t in ys]


def _check_names(module, input_names, output_names, n_in: int, n_out: int) -> None:
    if len(input_names) != n_in or len(output_names) != n_out:
        raise QwtError("the number of names does not match the module's inputs / outputs",
                       notes=[f"{n_in} inputs, names {input_names}", f"{n_out} outputs, names {output_names}"],
                       fix="pass one input name per example input and one output name per output")
    names = input_names + output_names
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise QwtError(f"input/output name(s) used twice: {', '.join(dup)}",
                       fix="give every input and output its own name (an ONNX value has one name)")
    state = {k for k, _ in module.named_parameters()} | {k for k, _ in module.named_buffers()}
    clash = [n for n in names if n in state]
    if clash:
        raise QwtError(f"input/output name(s) {', '.join(clash)} are parameter names of the module",
                       notes=["the exporter would rename the parameter, and compensation keyed by its name "
                              "would no longer find it"],
                       fix="choose other input/output names")


def _export(torch, module, inputs, n_out: int, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    in_names = [_PLACEHOLDER.format("in", i) for i in range(len(inputs))]
    out_names = [_PLACEHOLDER.format("out", i) for i in range(n_out)]
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.onnx.export(module, inputs, buf, dynamo=False, input_names=in_names, output_names=out_names,
                              dynamic_axes=axes, opset_version=opset, training=torch.onnx.TrainingMode.PRESERVE,
                              keep_initializers_as_inputs=True, do_constant_folding=True)
    except Exception as e:  # noqa: BLE001  (unsupported op, control flow the tracer cannot follow...)
        raise QwtError("torch.onnx.export failed", notes=[f"{type(e).__name__}: {str(e)[:400]}"],
                       fix="see the exporter's message; an unsupported op may need a newer --opset") from None
    for w in caught:
        logger.debug("torch.onnx.export: %s", str(w.message)[:200])
    model = onnx.load_from_string(buf.getvalue())
    inits = {t.name for t in model.graph.initializer}
    inputs_kept = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(inputs_kept)
    return model


def _rename_interface(model: onnx.ModelProto, input_names: list[str], output_names: list[str]) -> None:
    """Placeholders -> requested names; an internal value already holding a requested name is renamed."""
    g = model.graph
    wanted = dict(zip([i.name for i in g.input], input_names)) | dict(zip([o.name for o in g.output], output_names))
    inits = {t.name for t in g.initializer}
    clash = sorted(inits & set(wanted.values()))
    if clash:  # a name of a constant the exporter made (not a parameter: those were refused before)
        raise QwtError(f"input/output name(s) {', '.join(clash)} are initializer names of the exported graph",
                       fix="choose other input/output names")
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    taken = produced | inits | set(wanted.values())
    moved = {}
    for name in set(wanted.values()) & (produced - set(wanted)):
        k = 1
        while f"{name}.{k}" in taken:
            k += 1
        moved[name] = f"{name}.{k}"
        taken.add(moved[name])
    rename = moved | wanted
    for n in g.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
        n.output[:] = [rename.get(x, x) for x in n.output]
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vi.name = rename.get(vi.name, vi.name)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise QwtError("the exported model is not valid ONNX", notes=[f"{type(e).__name__}: {str(e)[:300]}"],
                       fix="report this with the module; try another --opset meanwhile") from None


def _check_outputs(torch, module, model, inputs, reference, dynamic_batch, atol, rtol):
    """output -> (max abs error, max rel error) over the example batch (and twice it when dynamic)."""
    from .runtime import make_session

    session = make_session(model, optimized=True)
    names = [i.name for i in model.graph.input]
    cases = [(inputs, reference)]
    if dynamic_batch:
        doubled = tuple(torch.cat([x, x]) for x in inputs)
        cases.append((doubled, _forward(torch, module, doubled)))
    errors: dict[str, tuple[float, float]] = {}
    for xs, ref in cases:
        try:
            got = session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, xs)})
        except Exception as e:  # noqa: BLE001
            raise QwtError(f"the exported model fails in onnxruntime at batch {xs[0].shape[0]}",
                           notes=[f"{type(e).__name__}: {str(e)[:300]}"] +
                                 (["the graph may hold a batch size taken from the example (x.view(1, -1)...)"]
                                  if xs is not inputs else []),
                           fix="use x.flatten(1) / x.view(x.size(0), -1) instead of fixed sizes, "
                               "or export with dynamic_batch=False (--static-batch)") from None
        for o, r, y in zip(model.graph.output, ref, got):
            if r.shape != y.shape:
                raise QwtError(f"output '{o.name}' has shape {y.shape} in ONNX but {r.shape} in PyTorch",
                               fix="the traced graph fixed a shape from the example inputs; avoid fixed sizes")
            diff = float(np.max(np.abs(y.astype(np.float64) - r))) if r.size else 0.0
            peak = float(np.max(np.abs(r))) if r.size else 0.0
            prev = errors.get(o.name, (0.0, 0.0))
            errors[o.name] = (max(prev[0], diff), max(prev[1], diff / peak if peak > 0 else diff))
            if not diff <= atol + rtol * peak:
                raise QwtError(f"the exported model does not reproduce the PyTorch output '{o.name}'",
                               notes=[f"batch {xs[0].shape[0]}: max |ONNX - PyTorch| {diff:.3g} > "
                                      f"atol {atol:g} + rtol {rtol:g} * max|output| {peak:.3g}"],
                               fix="look for behaviour the tracer fixes from the example (Python-side state, "
                                   "data-dependent branches); nothing was written") from None
    return errors, [int(xs[0].shape[0]) for xs, _ in cases]


def load_factory(spec: str):
    """``package.module:function`` or ``path/to/file.py:function`` -> the module that function returns."""
    from .plugins import load_object

    factory = load_object(spec, "the model factory", "torchvision.models:resnet18 or net.py:make")
    try:
        return factory()
    except Exception as e:  # noqa: BLE001  (the user's code)
        raise QwtError(f"cannot build the module from '{spec}'", notes=[f"{type(e).__name__}: {str(e)[:300]}"],
                       fix="pass MODULE:FUNCTION where FUNCTION() returns a torch.nn.Module") from None
