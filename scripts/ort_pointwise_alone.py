#!/usr/bin/env python3
"""ONNX Runtime on one 1x1 conv (+ residual) + ReLU alone, NCHW in and out.

ResNet50's batch-10 1x1 conv shapes, each exported from PyTorch as a
one-conv ONNX model and timed in ONNX Runtime (2 intra-op threads, 5
warm-up + 30 timed runs; min and median): the kernel alone, to set
against ORT's whole-model profile (scripts/profile_reference.py), where
the convs keep ORT's channel-blocked layout from one to the next, and
against wick's 1x1 conv alone. Not run by CI.

    .venv/bin/python scripts/ort_pointwise_alone.py
"""
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

# (batch, in channels, out channels, plane side, residual)
SHAPES = [
    (10, 64, 256, 56, True),
    (10, 64, 256, 56, False),
    (10, 256, 1024, 14, True),
    (10, 128, 512, 28, True),
    (10, 256, 64, 56, False),
    (10, 512, 128, 28, False),
    (10, 512, 2048, 7, True),
    (10, 2048, 512, 7, False),
]


class PointwiseBlock(torch.nn.Module):
    """relu(conv1x1(x) (+ r))."""

    def __init__(self, channels, outs, residual):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, outs, 1)
        self.residual = residual

    def forward(self, x, r):
        y = self.conv(x)
        if self.residual:
            y = y + r
        return torch.relu(y)


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conv.onnx"
        for n, c, o, hw, residual in SHAPES:
            model = PointwiseBlock(c, o, residual).eval()
            x, r = torch.randn(n, c, hw, hw), torch.randn(n, o, hw, hw)
            torch.onnx.export(model, (x, r), str(path), input_names=["x", "r"], output_names=["y"], dynamo=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            names = {i.name for i in session.get_inputs()}
            feed = {k: v.numpy() for k, v in (("x", x), ("r", r)) if k in names}
            for _ in range(5):
                session.run(None, feed)
            times = []
            for _ in range(30):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            flops = 2 * n * c * o * hw * hw
            print(
                f"{c} -> {o} on {hw}x{hw}, batch {n}, residual {residual}: "
                f"min {min(times) * 1e3:.3f} ms, median {np.median(times) * 1e3:.3f} ms, "
                f"{flops / min(times) / 1e9:.0f} GFLOP/s"
            )


if __name__ == "__main__":
    main()
