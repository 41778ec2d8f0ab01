"""InsertQDQPass: the one generic inserter that reads the QuantPlan.

For every planned layer (activation ``x``, weight ``W``, bias ``b``)::

    x ─► Q ─► DQ ─┐                         (one Q/DQ pair per tensor, shared)
    W_int ─► DQ ──┼─► Conv/Gemm/MatMul ─► [Relu] ─► Q ─► DQ ─► consumers
    b_int32 ─► DQ ┘                                 (output pair: Conv/ConvTranspose)

* weights become integer constants with a per-channel DequantizeLinear on the
  output-channel axis (``axis`` from the plan), zero point 0;
* ``--target ort``: the bias becomes int32 with scale exactly ``s_x*s_w[c]``;
  ``s_w[c]`` is floored at ``|b[c]|/(s_x·2^30)`` so that the int32 code cannot
  overflow (a near-dead channel, ``quant`` module doc); counted in the stats as
  ``weight_scale_raised_for_int32_bias``;
  ``--target trt``: the bias stays float (TensorRT rejects an int32-bias DQ);
* a Conv/ConvTranspose/Gemm without a bias gets a zero bias, and a MatMul
  without a following bias Add gets a zero-bias ``Add`` (its output keeps the
  MatMul's output name), so that CWAC's fold always has a bias slot and the
  folded graph keeps the op histogram of this one.  For a 2-D MatMul on the
  ort target that bias is int32, like any MatMul+Add bias (onnxruntime turns
  the pair into QGemm);
* activation tensors get per-tensor Q/DQ.  Consumers that are planned layers
  read the DQ output; when the tensor is a layer's *output point* every
  consumer reads it (otherwise onnxruntime could not fuse the producer).

Names: ``<tensor>_quantized`` / ``<tensor>_dequantized`` for activations,
``<weight>_quantized`` for integer weights, ``<node>_...`` for Q/DQ nodes, so
every inserted object traces back to the float graph by name.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from ..config import QuantConfig
from ..observers import ActivationRange
from ..policy import QuantPlan
from ..quant import (
    ActivationQParams,
    activation_qparams,
    bias_scale_floor,
    quantize_bias,
    quantize_weight,
    weight_dtype,
)
from . import PassResult

logger = logging.getLogger(__name__)


class InsertQDQPass:
    def __init__(self, plan: QuantPlan, ranges: dict[str, ActivationRange], cfg: QuantConfig):
        self.plan = plan
        self.ranges = ranges
        self.cfg = cfg

    def __call__(self, graph: gs.Graph) -> PassResult:
        tensors = graph.tensors()
        nodes = {n.name: n for n in graph.nodes}
        stats: Counter = Counter()
        qparams: dict[str, ActivationQParams] = {}
        layer_names = {lp.node for lp in self.plan.layers}
        for name in self.plan.activation_tensors:
            qparams[name] = activation_qparams(self.ranges[name], self.cfg)
            everyone = name in self.plan.output_points
            readers = [n for n in tensors[name].outputs if everyone or n.name in layer_names]
            self._insert_activation(graph, tensors[name], qparams[name], readers)
            stats["activation_qdq"] += 1
        for lp in self.plan.layers:
            node = nodes[lp.node]
            s_x = qparams[lp.activation].scale
            bias_node, bias_input = (nodes[lp.bias_node], lp.bias_input) if lp.bias else (node, 2)
            int32_bias = lp.op != "MatMul" or lp.bias is not None
            floor = None
            if lp.bias is not None and self.cfg.target == "ort":  # an int32 bias (a zero one added below needs none)
                floor = self._bias_floor(bias_node.inputs[bias_input], s_x, node.inputs[1].shape[lp.axis])
            s_w = self._quantize_weight(graph, node, lp.axis, floor)
            if floor is not None:
                stats["weight_scale_raised_for_int32_bias"] += int(np.count_nonzero(s_w == floor))
            if lp.bias is None:
                # a zero bias gives CWAC a slot to fold into without changing the op histogram
                zero = gs.Constant(f"{node.name}_bias", np.zeros(s_w.shape, np.float32))
                if lp.op == "MatMul":
                    bias_node, bias_input = self._add_bias_add(graph, node, zero), 1
                    x = node.inputs[0]
                    int32_bias = x.shape is not None and len(x.shape) == 2
                else:
                    node.inputs.append(zero)
                stats["zero_bias_added"] += 1
            if int32_bias and self.cfg.target == "ort":
                stats["bias_clipped"] += self._quantize_bias(graph, bias_node, bias_input, s_x, s_w)
            stats["layers"] += 1
        graph.cleanup().toposort()
        logger.info("inserted Q/DQ for %d layers, %d activation tensors", stats["layers"], stats["activation_qdq"])
        return PassResult(graph, stats["layers"] > 0, dict(stats))

    def _insert_activation(self, graph: gs.Graph, t: gs.Variable, qp: ActivationQParams, readers: list[gs.Node]) -> None:
        scale = gs.Constant(f"{t.name}_scale", np.array(qp.scale, np.float32))
        zp = gs.Constant(f"{t.name}_zero_point", qp.zero_point)
        q = gs.Variable(f"{t.name}_quantized", dtype=qp.zero_point.dtype, shape=t.shape)
        dq = gs.Variable(f"{t.name}_dequantized", dtype=np.float32, shape=t.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", f"{t.name}_QuantizeLinear", inputs=[t, scale, zp], outputs=[q]))
        graph.nodes.append(gs.Node("DequantizeLinear", f"{t.name}_DequantizeLinear", inputs=[q, scale, zp], outputs=[dq]))
        for reader in readers:
            for i, inp in enumerate(reader.inputs):
                if inp is t:
                    reader.inputs[i] = dq

    @staticmethod
    def _add_bias_add(graph: gs.Graph, node: gs.Node, bias: gs.Constant) -> gs.Node:
        """MatMul -> y  becomes  MatMul -> y_matmul -> Add(bias) -> y."""
        y = node.outputs[0]
        raw = gs.Variable(f"{y.name}_matmul", dtype=y.dtype, shape=y.shape)
        node.outputs[0] = raw
        add = gs.Node("Add", f"{node.name}_bias_Add", inputs=[raw, bias], outputs=[y])
        graph.nodes.append(add)
        return add

    @staticmethod
    def _bias_floor(b: gs.Tensor, s_x: np.float32, channels: int) -> np.ndarray | None:
        """Per-channel weight scale floor that keeps the int32 bias code within ``INT32_BIAS_BOUND``.

        The bias is only int32 on the ort target (its scale must be exactly s_x·s_w[c]); TensorRT keeps a
        float bias, which cannot overflow, so the trt target needs no floor.  onnxruntime's quantizer does
        the same (per channel, raising the weight scale; see ``quant`` module doc)."""
        values = np.asarray(b.values) if isinstance(b, gs.Constant) else None
        if values is None or values.size != channels:
            return None
        floor = bias_scale_floor(values, s_x)
        return floor if np.any(floor > 0) else None

    def _quantize_weight(self, graph: gs.Graph, node: gs.Node, axis: int, floor: np.ndarray | None) -> np.ndarray:
        w = node.inputs[1]
        w_q, s_w = quantize_weight(np.asarray(w.values), axis, self.cfg.weight_qmax, floor)
        dtype = weight_dtype(self.cfg)
        w_int = gs.Constant(f"{w.name}_quantized", w_q.astype(dtype))
        scale = gs.Constant(f"{w.name}_scale", s_w)
        zp = gs.Constant(f"{w.name}_zero_point", np.zeros(s_w.shape, dtype))
        dq = gs.Variable(f"{w.name}_dequantized", dtype=np.float32, shape=w.shape)
        node.inputs[1] = dq
        graph.nodes.append(gs.Node("DequantizeLinear", f"{node.name}_weight_DequantizeLinear",
                                   attrs={"axis": axis}, inputs=[w_int, scale, zp], outputs=[dq]))
        return s_w

    def _quantize_bias(self, graph: gs.Graph, node: gs.Node, index: int, s_x: np.float32, s_w: np.ndarray) -> int:
        b = node.inputs[index]
        b_q, scale, clipped = quantize_bias(np.asarray(b.values), s_x, s_w)
        if clipped:
            logger.debug("%s: %d bias values clipped to int32", node.name, clipped)
        dq = gs.Variable(f"{b.name}_dequantized", dtype=np.float32, shape=b.shape)
        node.inputs[index] = dq
        graph.nodes.append(gs.Node(
            "DequantizeLinear", f"{node.name}_bias_DequantizeLinear", attrs={"axis": 0},
            inputs=[gs.Constant(f"{b.name}_quantized", b_q), gs.Constant(f"{b.name}_scale", scale),
                    gs.Constant(f"{b.name}_zero_point", np.zeros(scale.shape, np.int32))],
            outputs=[dq]))
        return clipped
