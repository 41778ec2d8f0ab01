"""A PyTorch-side QwT-v2 reference on the exact grid ``compile`` uses (needs the ``[torch]`` extra).

``QuantSim(module)`` traces the module with ``torch.fx`` (Conv1d/2d/3d and Linear modules, subclasses
included, as leaves) and mirrors the default policy of ``policy.py`` / ``InsertQDQPass`` on that graph:

* a layer is a Conv/Linear module called once, keyed by its weight's parameter name (the name
  ``export`` keeps as the ONNX initializer name);
* a BatchNorm module that is the only reader of a Conv's output folds into it as ``FoldBatchNormPass``
  does it: ``s = γ/sqrt(σ²+ε)`` in float64 (ε as the float32 ONNX attribute), ``W' = s·W``,
  ``b' = s·(b − μ) + δ``, cast to float32;
* activation quantizers, per tensor: every layer's input (read quantized by the layers only), and each
  Conv's *output point* — its (BN-folded) output, or the output of a single following ReLU or ReLU6-like
  clamp at 0 (as ``policy._output_point``) — unless it
  is a module output; an output point is read quantized by every reader;
* weights per output channel, symmetric narrow range (``quant.quantize_weight``, ``QuantConfig.weight_qmax``:
  [−63, 63] for the default ort target); activations from ``quant.activation_qparams`` on ranges
  observed with min/max on the float module; ``--target ort``: Conv and 2-D Linear biases on the int32
  grid ``s_x·s_w`` (``quant.quantize_bias``), s_w floored so that it fits (``quant.bias_scale_floor``);
* fake quantization ``(clip(round(x / s) + z) − z)·s`` in float32, round half to even like
  QuantizeLinear.

``fit()`` fits CWAC (``y' = g ⊙ y + β`` after each layer, global target: the float module's tensor)
layer by layer in topological order, each layer seeing every earlier compensation (the staged protocol
of DESIGN.md with one layer per stage), with ``cwac.closed_form.ChannelSums`` / ``fit_affine``.  ``save()``
writes what ``compile`` takes: ``--cwac-params`` (``<weight>:gain`` / ``:bias``) and ``--act-ranges``
(``<weight>:input_range`` / ``:output_range``).  A model the reference cannot mirror (a functional
conv on a parameter, a ConvTranspose...) is refused with a ``QwtError``.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from .config import QuantConfig
from .cwac.closed_form import ChannelSums, fit_affine
from .errors import QwtError
from .observers import ActivationRange, MinMaxObserver
from .quant import (
    activation_dtype,
    activation_qparams,
    bias_scale_floor,
    quantize_bias,
    quantize_weight,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TorchLayer:
    weight: str  # parameter name, e.g. 'features.0.weight'
    node: str  # fx node of the module call
    kind: str  # 'conv' or 'linear'
    result: str  # fx node whose value is the (BN-folded) layer output: the BN node, else the layer node
    input: str  # fx node read (quantized) as the activation
    output_point: str | None  # fx node quantized after the layer (Conv only)
    w: object = None  # dequantized folded weight (torch tensor)
    s_w: np.ndarray | None = None  # its per-channel scales
    int32_bias: bool = False  # bias on the int32 grid s_x·s_w (ort target, Conv or 2-D Linear)
    b_grid: tuple | None = None  # (int32 bias, its scale)
    b_float: np.ndarray | None = None  # folded float bias
    gain: np.ndarray | None = None
    bias: np.ndarray | None = None


class QuantSim:
    """Fake-quantized twin of a module on ``compile``'s grid (see module doc)."""

    def __init__(self, module, qcfg: QuantConfig = QuantConfig()):
        import torch
        import torch.fx

        self.torch, self.qcfg = torch, qcfg
        if not isinstance(module, torch.nn.Module):
            raise QwtError(f"QuantSim takes a torch.nn.Module, got {type(module).__name__}", fix="pass the model")
        self.module = module.eval()
        leaves = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)

        class _Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m, qualname):
                return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

        try:
            self.graph = _Tracer().trace(self.module)
        except Exception as e:  # noqa: BLE001
            raise QwtError("torch.fx cannot trace the module", notes=[f"{type(e).__name__}: {str(e)[:300]}"],
                           fix="QuantSim needs an fx-traceable module") from None
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.submodules = dict(self.module.named_modules())
        self.layers = self._find_layers(leaves)
        self.by_node = {lay.node: lay for lay in self.layers}
        self.folded_bn = {lay.result for lay in self.layers if lay.result != lay.node}
        self.inputs = {lay.input for lay in self.layers}
        self.outputs = {lay.output_point for lay in self.layers if lay.output_point}
        self.qparams: dict[str, tuple] = {}
        self.ranges: dict[str, tuple[float, float]] = {}

    # -- structure ---------------------------------------------------------------------------------------
    def _find_layers(self, leaves) -> list[TorchLayer]:
        torch, F = self.torch, self.torch.nn.functional
        functional = {F.conv1d, F.conv2d, F.conv3d, F.linear, F.conv_transpose2d, torch.matmul}
        calls: dict[str, int] = {}
        for n in self.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
            if n.op == "call_function" and n.target in functional and any(
                    getattr(a, "op", None) == "get_attr" for a in n.args):
                raise QwtError(f"QuantSim cannot mirror '{n.name}': a functional {n.target.__name__} on a parameter",
                               fix="use nn.Conv*/nn.Linear modules for the layers to quantize")
            if n.op == "call_module" and isinstance(self.submodules[n.target], torch.nn.modules.conv._ConvTransposeNd):
                raise QwtError(f"QuantSim does not mirror ConvTranspose ('{n.target}')", fix="none yet")
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        returned = set(out_node.all_input_nodes)
        layers = []
        for n in self.graph.nodes:
            if n.op != "call_module" or not isinstance(self.submodules[n.target], leaves):
                continue
            if calls[n.target] > 1 or not n.args or not hasattr(n.args[0], "op"):
                continue  # shared weight / constant activation: compile leaves these in float too
            kind = "linear" if isinstance(self.submodules[n.target], torch.nn.Linear) else "conv"
            result = n
            if kind == "conv" and len(n.users) == 1 and n not in returned:
                user = next(iter(n.users))
                if user.op == "call_module" and isinstance(self.submodules[user.target],
                                                           torch.nn.modules.batchnorm._BatchNorm):
                    result = user
            point = None
            if kind == "conv" and result not in returned:
                point = result
                if len(result.users) == 1 and _is_relu(torch, self.submodules, next(iter(result.users))):
                    relu = next(iter(result.users))
                    point = relu if relu not in returned else result
            layers.append(TorchLayer(f"{n.target}.weight", n.name, kind, result.name, n.args[0].name,
                                     point.name if point is not None else None))
        if not layers:
            raise QwtError("the module has no Conv/Linear layer to quantize", fix="nothing to do")
        return layers

    # -- execution ----------------------------------------------------------------------------------------
    def _run(self, inputs, quantize: bool, compensate: bool = True, observe=None):
        """Run the traced graph to its output."""
        walk = self._walk(inputs, quantize, compensate, set(), observe)
        while True:
            try:
                next(walk)
            except StopIteration as done:
                return done.value

    def _walk(self, inputs, quantize: bool, compensate: bool, yield_at: set[str], observe=None):
        """A generator over the traced graph: yields ``(node, value)`` at the nodes in ``yield_at`` (a layer's
        value before its compensation, which is applied when the walk resumes, so a fit made meanwhile counts)
        and returns the module's output.  Values are dropped after their last reader."""
        torch = self.torch
        env, qenv = {}, {}
        args_iter = iter(inputs)
        last = self._last_use

        def load(a):
            return torch.fx.node.map_arg(a, lambda x: env[x.name])

        for i, n in enumerate(self.graph.nodes):
            if n.op == "placeholder":
                value = next(args_iter)
            elif n.op == "output":
                return load(n.args[0])
            elif n.op == "get_attr":
                value = _getattr(self.module, n.target)
            elif quantize and n.name in self.by_node:
                lay = self.by_node[n.name]
                value = self._layer(lay, qenv.get(lay.input, env[lay.input]))
                if n.name in yield_at:
                    yield n.name, value
                if compensate and lay.gain is not None:
                    shape = (1, -1) + (1,) * (value.ndim - 2) if lay.kind == "conv" else (-1,)
                    beta = self._snapped_bias(lay) if lay.int32_bias else lay.bias
                    value = value * torch.from_numpy(lay.gain).view(shape) + torch.from_numpy(beta).view(shape)
            elif quantize and n.name in self.folded_bn:
                value = env[n.args[0].name]
            else:
                args, kwargs = load(n.args), load(n.kwargs)
                if n.op == "call_module":
                    value = self.submodules[n.target](*args, **kwargs)
                elif n.op == "call_function":
                    value = n.target(*args, **kwargs)
                else:
                    value = getattr(args[0], n.target)(*args[1:], **kwargs)
                if n.name in yield_at:
                    yield n.name, value
            if observe is not None and (n.name in self.inputs or n.name in self.outputs):
                observe(n.name, value)
            if quantize and n.name in self.outputs:
                value = self._fake_quant(n.name, value)
            elif quantize and n.name in self.inputs:
                qenv[n.name] = self._fake_quant(n.name, value)
            env[n.name] = value
            for dead in last.get(i, ()):
                env.pop(dead, None)
                qenv.pop(dead, None)
        raise AssertionError("graph without output")

    @property
    def _last_use(self) -> dict[int, list[str]]:
        """node index -> names of the values last read there."""
        if not hasattr(self, "_last_use_cache"):
            index = {n.name: i for i, n in enumerate(self.graph.nodes)}
            last: dict[int, list[str]] = {}
            for n in self.graph.nodes:
                if n.op != "output" and n.users:
                    last.setdefault(max(index[u.name] for u in n.users), []).append(n.name)
            self._last_use_cache = last
        return self._last_use_cache

    def _layer(self, lay: TorchLayer, x):
        torch = self.torch
        mod = self.submodules[self.nodes[lay.node].target]
        lay.int32_bias = self.qcfg.target == "ort" and (lay.kind == "conv" or x.ndim == 2)
        if lay.w is None:
            self._quantize_layer(lay, mod, self.qparams[lay.input][0] if lay.int32_bias else None)
        b = lay.b_float
        if lay.int32_bias:
            b_q, scale, _ = quantize_bias(b, self.qparams[lay.input][0], lay.s_w)
            b = b_q.astype(np.float32) * scale
            lay.b_grid = (b_q, scale)
        y = torch.func.functional_call(mod, {"weight": lay.w, **({"bias": torch.zeros(b.shape)} if mod.bias is not None else {})}, (x,))
        shape = (1, -1) + (1,) * (y.ndim - 2) if lay.kind == "conv" else (-1,)
        return y + torch.from_numpy(np.asarray(b, np.float32)).view(shape)

    def _leave_unrepresentable(self, lay: TorchLayer) -> int:
        """Channels whose folded int32 bias ``(g·b + β)/(s_x·|g|·s_w)`` would not fit int32 (near-dead channels:
        a BatchNorm with γ ≈ 0 leaves s_w ≈ 1e-10) get g = 1, β = 0: the fold would clip them."""
        if not lay.int32_bias:
            return 0
        b_q, scale = lay.b_grid
        g = lay.gain.astype(np.float64)
        s_w = np.where(g == 0, lay.s_w, lay.s_w * np.abs(lay.gain)).astype(np.float32)
        new_scale = (np.float32(self.qparams[lay.input][0]) * s_w).astype(np.float32).astype(np.float64)
        code = np.round((g * b_q * scale.astype(np.float64) + lay.bias) / new_scale)
        bad = ~(np.abs(code) < 2**31 - 1)
        lay.gain = np.where(bad, 1.0, lay.gain).astype(np.float32)
        lay.bias = np.where(bad, 0.0, lay.bias).astype(np.float32)
        return int(bad.sum())

    def _snapped_bias(self, lay: TorchLayer) -> np.ndarray:
        """β moved so that g·b + β lies on the folded layer's int32 bias grid, as ``fold_compensation.snap_bias``
        does: the compensated output is then what the folded int8 layer computes, not only close to it."""
        b_q, scale = lay.b_grid
        b = b_q.astype(np.float64) * scale.astype(np.float64)
        g = lay.gain
        s_w = np.where(g == 0, lay.s_w, lay.s_w * np.abs(g)).astype(np.float32)
        new_scale = (np.float32(self.qparams[lay.input][0]) * s_w).astype(np.float32).astype(np.float64)
        target = np.round((g * b + lay.bias) / new_scale) * new_scale
        return (target - g.astype(np.float64) * b).astype(np.float32)

    def _quantize_layer(self, lay: TorchLayer, mod, s_x: float | None) -> None:
        """``s_x``: the input scale when the bias is int32, to floor s_w as compile does (``quant`` module doc)."""
        w = mod.weight.detach().cpu().numpy().astype(np.float32)
        b = mod.bias.detach().cpu().numpy().astype(np.float32) if mod.bias is not None else None
        if lay.result != lay.node:
            w, b = _fold_bn(w, b, self.submodules[self.nodes[lay.result].target])
        b = np.zeros(w.shape[0], np.float32) if b is None else b
        w_q, s_w = quantize_weight(w, 0, self.qcfg.weight_qmax, None if s_x is None else bias_scale_floor(b, s_x))
        lay.s_w, lay.b_float = s_w, b
        deq = w_q.astype(np.float32) * s_w.reshape((-1,) + (1,) * (w.ndim - 1))
        lay.w = self.torch.from_numpy(deq.astype(np.float32))

    def _fake_quant(self, name: str, x):
        scale, zp, lo, hi = self.qparams[name]
        q = self.torch.clamp(self.torch.round(x / scale) + zp, lo, hi)
        return (q - zp) * scale

    # -- calibration and fit --------------------------------------------------------------------------------
    def calibrate(self, batches) -> dict[str, tuple[float, float]]:
        """Min/max ranges of every quantized activation on the float module; sets the quantizers."""
        observers = {name: MinMaxObserver() for name in self.inputs | self.outputs}
        with self.torch.no_grad():
            for xs in batches:
                self._run(_tuple(xs), quantize=False,
                          observe=lambda name, v: observers[name].update(v.detach().cpu().numpy()))
        dtype = activation_dtype(self.qcfg)
        info = np.iinfo(np.uint8 if dtype.__name__ == "uint8" else np.int8) if dtype in (np.uint8, np.int8) else None
        lo_q, hi_q = (int(info.min), int(info.max)) if info else ((0, 15) if "uint" in dtype.__name__ else (-8, 7))
        for name, obs in observers.items():
            self.ranges[name] = obs.range()
            qp = activation_qparams(ActivationRange(name, *self.ranges[name], "minmax"), self.qcfg)
            self.qparams[name] = (float(qp.scale), float(qp.zero_point), lo_q, hi_q)
        for lay in self.layers:
            lay.w = None
        return self.ranges

    def fit(self, batches, lam: float = 0.0, max_gain: float = 4.0) -> dict[str, dict]:
        """CWAC, global target, layer by layer in topological order (see module doc); returns per-layer stats."""
        if not self.qparams:
            raise QwtError("QuantSim.fit before calibrate", fix="call calibrate(batches) first")
        batches = [_tuple(xs) for xs in batches]
        for lay in self.layers:
            lay.gain = lay.bias = None
        # one quantized and one float walk per batch, advanced layer by layer: each layer's fit sees every
        # earlier compensation (applied as the quantized walks resume) at the cost of a single pass
        qwalks = [self._walk(xs, True, True, {lay.node for lay in self.layers}) for xs in batches]
        fwalks = [self._walk(xs, False, False, {lay.result for lay in self.layers}) for xs in batches]
        fseen: list[dict] = [{} for _ in batches]
        stats = {}
        with self.torch.no_grad():
            for lay in self.layers:
                axis = 1 if lay.kind == "conv" else -1
                sums = None
                for qw, fw, seen in zip(qwalks, fwalks, fseen):
                    name, q = next(qw)
                    assert name == lay.node, (name, lay.node)
                    while lay.result not in seen:
                        k, v = next(fw)
                        seen[k] = v
                    f = seen.pop(lay.result)
                    sums = sums or ChannelSums(q.shape[axis], axis)
                    sums.update(q.detach().cpu().numpy(), f.detach().cpu().numpy())
                before = sums.mse()
                fitted = fit_affine(sums, lam, max_gain)
                lay.gain, lay.bias, st = fitted.gain, fitted.bias, dict(fitted.stats)
                st["int32_overflow_left_alone"] = self._leave_unrepresentable(lay)
                stats[lay.weight] = {**st, "mse_before": before, "mse_after": sums.mse(lay.gain, lay.bias)}
        return stats

    def __call__(self, *inputs, quantize: bool = True, compensate: bool = True):
        with self.torch.no_grad():
            return self._run(inputs, quantize=quantize, compensate=compensate)

    # -- what compile takes -------------------------------------------------------------------------------
    def cwac_arrays(self) -> dict[str, np.ndarray]:
        return {f"{lay.weight}:{k}": getattr(lay, k) for lay in self.layers if lay.gain is not None
                for k in ("gain", "bias")}

    def range_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for lay in self.layers:
            out[f"{lay.weight}:input_range"] = np.array(self.ranges[lay.input], np.float64)
            if lay.output_point:
                out[f"{lay.weight}:output_range"] = np.array(self.ranges[lay.output_point], np.float64)
        return out

    def save(self, cwac_path, ranges_path) -> None:
        np.savez(cwac_path, **self.cwac_arrays())
        np.savez(ranges_path, **self.range_arrays())


def _tuple(xs) -> tuple:
    return tuple(xs) if isinstance(xs, (tuple, list)) else (xs,)


def _getattr(obj, target: str):
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_relu(torch, submodules, node) -> bool:
    """ReLU, or a clamp whose lower bound is 0 (ReLU6, Hardtanh(0, x), clamp(min=0)): what exports as a Relu
    or a ``Clip(0, ·)``, after which ``policy._output_point`` puts a Conv's output quantizer."""
    F = torch.nn.functional
    if node.op == "call_module":
        m = submodules[node.target]
        return type(m) in (torch.nn.ReLU, torch.nn.ReLU6) or (type(m) is torch.nn.Hardtanh and m.min_val == 0)
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, F.relu6):
            return True
        if node.target in (torch.clamp, torch.clip):
            lo = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
            return isinstance(lo, (int, float)) and lo == 0
        if node.target is F.hardtanh:
            return node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0) == 0
        return False
    return node.op == "call_method" and node.target in ("relu", "relu6") or (
        node.op == "call_method" and node.target in ("clamp", "clip")
        and node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None) == 0)


def _fold_bn(w: np.ndarray, b: np.ndarray | None, bn) -> tuple[np.ndarray, np.ndarray]:
    """FoldBatchNormPass's arithmetic on a PyTorch BatchNorm (eps as the float32 ONNX attribute)."""
    c = w.shape[0]
    gamma = bn.weight.detach().numpy() if bn.weight is not None else np.ones(c, np.float32)
    beta = bn.bias.detach().numpy() if bn.bias is not None else np.zeros(c, np.float32)
    mean, var = bn.running_mean.detach().numpy(), bn.running_var.detach().numpy()
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(np.float32(bn.eps)))
    b = np.zeros(c, w.dtype) if b is None else b
    w_new = (w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
    b_new = (s * (b.astype(np.float64) - mean.astype(np.float64)) + beta.astype(np.float64)).astype(w.dtype)
    return w_new, b_new
