"""Tiny models built in code for unit tests.

``conv_net``::

    x[N,3,8,8] ─► Conv(w1,b1) ─► BN ─► Relu ─► r1 ─► Conv(w2) ─► Add(·, r1) ─► GAP ─► Flatten
                                                                                  │
               y[N,5] ◄── MatMul(wm) ◄── Gemm(wg, bg, transB=1) ◄────────────────┘
"""
from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper


def _f32(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def conv_net(seed: int = 0, opset: int = 13, batch: str | int = "N", hw: str | int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g1"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g1", "wm"], ["y"], name="mm"),
    ]
    inits = [_f32("w1", rng.normal(size=(8, 3, 3, 3))), _f32("b1", rng.normal(size=8)),
             _f32("g", rng.uniform(0.5, 2, 8)), _f32("be", rng.normal(size=8)), _f32("mu", rng.normal(size=8)),
             _f32("var", rng.uniform(0.5, 2, 8)), _f32("w2", rng.normal(size=(8, 8, 3, 3)) * 0.2),
             _f32("wg", rng.normal(size=(16, 8))), _f32("bg", rng.normal(size=16)), _f32("wm", rng.normal(size=(16, 5)))]
    g = helper.make_graph(nodes, "conv_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def mlp_with_constants(opset: int = 11) -> onnx.ModelProto:
    """x[N,4] ─► MatMul(Constant W1) ─► Relu ─► Gemm(W2 transB=0, Constant b) ─► y; unnamed nodes."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32))
    b = numpy_helper.from_array(rng.normal(size=3).astype(np.float32))
    nodes = [
        helper.make_node("Constant", [], ["W1"], value=w1),
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Constant", [], ["B"], value=b),
        helper.make_node("Gemm", ["hr", "W2", "B"], ["y"]),
    ]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [_f32("W2", rng.normal(size=(6, 3)))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    return m


def calib_npz(path, n: int = 64, shape=(3, 8, 8), name: str = "x", seed: int = 0):
    rng = np.random.default_rng(seed)
    np.savez(path, **{name: rng.normal(size=(n, *shape)).astype(np.float32)})
    return path


def matmul_add(k: int = 6, n: int = 4) -> onnx.ModelProto:
    """x[N,k] ─► MatMul(W) ─► Add(b) ─► y[N,n]   (onnxruntime rewrites this pair into Gemm)."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    g = helper.make_graph(nodes, "mm_add", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                          [_f32("W", rng.normal(size=(k, n))), _f32("b", rng.normal(size=n))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def sigmoid_head_net(seed: int = 0) -> onnx.ModelProto:
    """A YOLO-like head: box and class convs joined, reshaped, split again; only the class part is scored::

        x[N,3,8,8] ─► Conv(stem) ─► Relu ─┬─► Conv(box, 4 ch) ─┐
                                          └─► Conv(cls, 3 ch) ─┴─► Concat ─► Reshape[N,7,64] ─► Split[4,3]
        y[N,7,64] ◄── Concat(box part, Sigmoid(class part)) ◄──────────────────────────────────────┘
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "ws", "bs"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["sr"], name="relu"),
        helper.make_node("Conv", ["sr", "wb", "bb"], ["box"], name="box_conv"),
        helper.make_node("Conv", ["sr", "wc", "bc"], ["cls"], name="cls_conv"),
        helper.make_node("Concat", ["box", "cls"], ["bc_cat"], name="cat", axis=1),
        helper.make_node("Reshape", ["bc_cat", "shape"], ["flat"], name="reshape"),
        helper.make_node("Split", ["flat", "split"], ["box_part", "cls_part"], name="split", axis=1),
        helper.make_node("Sigmoid", ["cls_part"], ["scores"], name="sigmoid"),
        helper.make_node("Concat", ["box_part", "scores"], ["y"], name="out", axis=1),
    ]
    inits = [_f32("ws", rng.normal(size=(8, 3, 3, 3)) * 0.5), _f32("bs", rng.normal(size=8)),
             _f32("wb", rng.normal(size=(4, 8, 1, 1))), _f32("bb", rng.normal(size=4)),
             _f32("wc", rng.normal(size=(3, 8, 1, 1))), _f32("bc", np.full(3, -3.0)),
             numpy_helper.from_array(np.array([0, 7, 64], np.int64), "shape"),
             numpy_helper.from_array(np.array([4, 3], np.int64), "split")]
    g = helper.make_graph(nodes, "sigmoid_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 64])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def masked_token_net(seed: int = 0, tokens: int = 6) -> onnx.ModelProto:
    """A per-token MLP with an attention mask, like an encoder's feed-forward block and masked pooling::

        x[N,T,4] ─► MatMul(up, 8) ─► Relu ─► MatMul(down, 4) ─► hidden[N,T,4]
        mask[N,T] (int64, 1 = a real token) ─► Cast ─► Unsqueeze ─► Mul(hidden) ─► ReduceSum(T) ─► pooled[N,4]

    Positions never mix, so what padding holds changes nothing at a real position."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w_up"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "w_down"], ["hidden"], name="down"),
        helper.make_node("Cast", ["mask"], ["maskf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"], name="unsqueeze"),
        helper.make_node("Mul", ["hidden", "mask3"], ["kept"], name="apply_mask"),
        helper.make_node("ReduceSum", ["kept", "axis1"], ["pooled"], name="pool", keepdims=0),
    ]
    inits = [_f32("w_up", rng.normal(size=(4, 8))), _f32("w_down", rng.normal(size=(8, 4))),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    g = helper.make_graph(nodes, "masked_tokens",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", tokens, 4]),
                           helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", tokens])],
                          [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", tokens, 4]),
                           helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def random_linear_net(convs, denses, channels: int = 3, hw: int = 6, tokens: bool = False,
                      seed: int = 0, features: bool = False) -> onnx.ModelProto:
    """A chain of quantizable layers drawn by a property test::

        x[N,channels,hw,hw] ─► convs ─┬─► GlobalAveragePool ─► Flatten ─► denses ─► y[N,·]     (tokens=False)
                                      └─► Reshape[N,C,HW] ─► Transpose[N,HW,C] ─► denses ─► y[N,HW,·]

    ``convs``: ``(op, out_channels, kernel, group, bias, relu, skip)`` with op ``Conv`` or ``ConvTranspose``
    (kernel 2, stride 2); ``group`` must divide both channel counts; ``skip`` (Conv only) ``"add"`` (a
    residual: ``out_channels`` equal to the input's) or ``"concat"`` (the layer's input and output joined
    on channels), else ``None``.  ``denses``: ``(op, out, bias, relu)`` with op ``Gemm`` (``transB`` 1 when
    ``out`` is odd; 2-D only, so never with ``tokens``) or ``MatMul`` (its bias, if any, in a following
    ``Add``).  ``features``: the conv stack's output is a second graph output."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, c = [], [], "x", channels

    def add(op, inputs, attrs=None, relu=False):
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"n{len(nodes)}", **(attrs or {})))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [out + "r"], name=f"n{len(nodes)}"))
            out += "r"
        return out

    def weight(shape, scale):
        name = f"w{len(inits)}"
        inits.append(_f32(name, rng.normal(size=shape) * scale))
        return name

    for op, out, k, group, bias, relu, skip in convs:
        if op == "Conv":
            ins = [x, weight((out, c // group, k, k), (c // group * k * k) ** -0.5)]
            attrs = {"pads": [k // 2] * 4, "group": group}
        else:
            ins = [x, weight((c, out // group, 2, 2), c ** -0.5)]
            attrs = {"strides": [2, 2], "group": group}
        if bias:
            ins.append(weight((out,), 0.5))
        y = add(op, ins, attrs, relu)
        if skip == "add":
            assert op == "Conv" and out == c, (op, out, c)
            y = add("Add", [x, y])
        elif skip == "concat":
            y, out = add("Concat", [x, y], {"axis": 1}), c + out
        x, c = y, out
    feature_map, feature_channels = x, c
    if tokens:
        inits.append(numpy_helper.from_array(np.array([0, c, -1], np.int64), "to_tokens"))
        x = add("Transpose", [add("Reshape", [x, "to_tokens"])], {"perm": [0, 2, 1]})
    else:
        x = add("Flatten", [add("GlobalAveragePool", [x])])
    for op, out, bias, relu in denses:
        if op == "Gemm":
            trans = out % 2
            ins = [x, weight((out, c) if trans else (c, out), c ** -0.5)] + ([weight((out,), 0.5)] if bias else [])
            x = add("Gemm", ins, {"transB": trans}, relu)
        else:
            x = add("MatMul", [x, weight((c, out), c ** -0.5)], relu=relu and not bias)
            if bias:
                x = add("Add", [x, weight((out,), 0.5)], relu=relu)
        c = out
    nodes[-1].output[0] = "y"
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", c] if tokens else ["N", c])]
    if features and convs:
        outputs.append(helper.make_tensor_value_info(feature_map, TensorProto.FLOAT, ["N", feature_channels, "H", "W"]))
    g = helper.make_graph(nodes, "random_linear_net",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, hw, hw])],
                          outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


@st.composite
def linear_chains(draw):
    """Hypothesis strategy: (input channels, convs, denses, tokens, features) for :func:`random_linear_net`.
    0–3 Conv / depthwise / grouped Conv / ConvTranspose layers, a Conv with or without a residual Add or a
    Concat of its input and output, then 1–2 Gemm (either weight layout) / MatMul (± bias Add) layers, with
    or without biases and Relus; the dense part runs per image or per position (3-D MatMul); the conv stack's
    output is a second graph output or not."""
    c = c0 = draw(st.sampled_from([2, 3, 4]))
    convs, upsampled = [], False
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["conv", "depthwise", "grouped", "transpose"]))
        if kind == "transpose" and upsampled:
            kind = "conv"
        out = c if kind == "depthwise" else draw(st.sampled_from([2, 4, 5]))
        group = {"depthwise": c, "grouped": 2 if c % 2 == 0 and out % 2 == 0 else 1}.get(kind, 1)
        op = "ConvTranspose" if kind == "transpose" else "Conv"
        upsampled |= op == "ConvTranspose"
        skips = [None] + (["concat"] if op == "Conv" else []) + (["add"] if op == "Conv" and out == c else [])
        skip = draw(st.sampled_from(skips))
        convs.append((op, out, draw(st.sampled_from([1, 3])), group, draw(st.booleans()), draw(st.booleans()), skip))
        c = c + out if skip == "concat" else out
    tokens = draw(st.booleans())
    denses = [(draw(st.sampled_from(["MatMul"] if tokens else ["Gemm", "MatMul"])), draw(st.integers(2, 5)),
               draw(st.booleans()), draw(st.booleans())) for _ in range(draw(st.integers(1, 2)))]
    return c0, convs, denses, tokens, draw(st.booleans())


def saved_random_chain(chain, seed: int, path, n_calib: int):
    """Build :func:`random_linear_net` for a :func:`linear_chains` draw, save it at ``path`` and return
    (calibration samples, the generator that drew them, input channels): what every random-chain test starts
    with."""
    channels, convs, denses, tokens, features = chain
    onnx.save(random_linear_net(convs, denses, channels, tokens=tokens, seed=seed, features=features), path)
    rng = np.random.default_rng(seed)
    calib = [{"x": rng.normal(size=(1, channels, 6, 6)).astype(np.float32)} for _ in range(n_calib)]
    return calib, rng, channels
