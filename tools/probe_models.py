"""Speed probes: models built in code with the *shape* of a real architecture and random weights, for timing
the compiler where no wheel ships the real model.  Their outputs mean nothing; their cost is the real one.

    python tools/probe_models.py u2net_like      # prints the folder holding model.onnx and calib.npz

``u2net_like``: a salient-object segmenter with U^2-Net-p's layout (nested residual U-blocks, 16 inner and 64
outer channels, six side outputs and a fused one, bilinear upsampling), written here from the paper's
description: 4.6 MB of float weights, a fixed batch of 1 at 320x320 — the model class that took over 15
minutes to compile (issue: compile speed).  Batch norms get random running statistics so that fold_bn has
work to do; the 16 calibration images are smooth random patterns, normalized.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

PROBES = ("u2net_like",)


def probe_dir(name: str) -> Path:
    """The probe's folder (model.onnx, calib.npz), built on first use (needs torch: the ``[torch]`` extra)."""
    if name not in PROBES:
        raise SystemExit(f"unknown probe model {name!r}: one of {', '.join(PROBES)}")
    root = Path(os.environ.get("QWT2_CACHE", Path.home() / ".cache" / "qwt2-onnx")) / "probe" / name
    if not (root / "model.onnx").is_file() or not (root / "calib.npz").is_file():
        root.mkdir(parents=True, exist_ok=True)
        _build_u2net_like(root)
    return root


def _build_u2net_like(root: Path, samples: int = 16) -> None:
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)

    def up(x, like):
        return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)

    class ConvBnRelu(nn.Module):
        def __init__(self, cin, cout, dilation=1):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    class ResidualU(nn.Module):
        """Depth-``depth`` U inside a block: encoder with pooling, a dilated bottom, decoder with skips."""

        def __init__(self, depth, cin, mid, cout):
            super().__init__()
            self.inp = ConvBnRelu(cin, cout)
            self.down = nn.ModuleList([ConvBnRelu(cout, mid)] + [ConvBnRelu(mid, mid) for _ in range(depth - 2)])
            self.bottom = ConvBnRelu(mid, mid, 2)
            self.dec = nn.ModuleList([ConvBnRelu(2 * mid, mid) for _ in range(depth - 2)] + [ConvBnRelu(2 * mid, cout)])

        def forward(self, x):
            hx = h = self.inp(x)
            skips = []
            for i, block in enumerate(self.down):
                h = block(F.max_pool2d(h, 2, 2, ceil_mode=True) if i else h)
                skips.append(h)
            d = self.bottom(h)
            for block, skip in zip(self.dec, reversed(skips)):
                d = block(torch.cat([up(d, skip) if d.shape[2:] != skip.shape[2:] else d, skip], 1))
            return d + hx

    class ResidualDilated(nn.Module):
        """The U without pooling: dilations 1, 2, 4, 8 and back."""

        def __init__(self, cin, mid, cout):
            super().__init__()
            self.inp = ConvBnRelu(cin, cout)
            self.enc = nn.ModuleList([ConvBnRelu(cout, mid), ConvBnRelu(mid, mid, 2), ConvBnRelu(mid, mid, 4),
                                      ConvBnRelu(mid, mid, 8)])
            self.dec = nn.ModuleList([ConvBnRelu(2 * mid, mid, 4), ConvBnRelu(2 * mid, mid, 2), ConvBnRelu(2 * mid, cout)])

        def forward(self, x):
            hx = h = self.inp(x)
            skips = []
            for block in self.enc:
                h = block(h)
                skips.append(h)
            d = skips.pop()
            for block in self.dec:
                d = block(torch.cat([d, skips.pop()], 1))
            return d + hx

    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList([ResidualU(7, 3, 16, 64), ResidualU(6, 64, 16, 64), ResidualU(5, 64, 16, 64),
                                      ResidualU(4, 64, 16, 64), ResidualDilated(64, 16, 64), ResidualDilated(64, 16, 64)])
            self.dec = nn.ModuleList([ResidualDilated(128, 16, 64), ResidualU(4, 128, 16, 64), ResidualU(5, 128, 16, 64),
                                      ResidualU(6, 128, 16, 64), ResidualU(7, 128, 16, 64)])
            self.side = nn.ModuleList([nn.Conv2d(64, 1, 3, padding=1) for _ in range(6)])
            self.fuse = nn.Conv2d(6, 1, 1)

        def forward(self, x):
            feats, h = [], x
            for i, block in enumerate(self.enc):
                h = block(F.max_pool2d(h, 2, 2, ceil_mode=True) if i else h)
                feats.append(h)
            d, outs = feats.pop(), []
            outs.append(d)
            for block in self.dec:
                skip = feats.pop()
                d = block(torch.cat([up(d, skip), skip], 1))
                outs.append(d)
            outs = outs[::-1]  # finest first
            sides = [self.side[0](outs[0])] + [up(self.side[i](t), x) for i, t in enumerate(outs[1:], 1)]
            fused = self.fuse(torch.cat(sides, 1))
            return tuple(torch.sigmoid(t) for t in [fused, *sides])

    model = Segmenter().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    torch.onnx.export(model, torch.rand(1, 3, 320, 320), str(root / "model.onnx"), input_names=["image"],
                      output_names=[f"d{i}" for i in range(7)], opset_version=13, dynamo=False)
    rng = np.random.default_rng(0)
    coarse = rng.random((samples, 3, 40, 40)).astype(np.float32)
    images = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)
    np.savez(root / "calib.npz", image=((images - 0.45) / 0.25).astype(np.float32))


if __name__ == "__main__":
    for name in sys.argv[1:] or PROBES:
        print(probe_dir(name))
