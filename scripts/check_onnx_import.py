#!/usr/bin/env python3
"""Checks `cargo xtask run FILE.onnx` against PyTorch (float64) and ONNX
Runtime on torchvision classifiers exported by both of torch's exporters,
and on MobileNetV1, which torchvision lacks (defined here: a chain of
depthwise and 1×1 convs, each 1×1 conv between two depthwise ones).

For each model: random weights (seeded) with non-trivial batch-norm
statistics, exported with `torch.onnx.export(..., opset_version=17)` by the
TorchScript exporter (`dynamo=False`) and by the dynamo exporter (the
default; it writes opset 18 and its weights as external data), then run by
wick with `--passes default` and `--passes none`, by ONNX Runtime, and by
PyTorch in float64. Prints max |diff| / output scale per pair; exits 1 when
wick is further than 1e-4 of the scale from PyTorch.

Needs torch, torchvision, onnx, onnxscript, onnxruntime, safetensors
(the repo's .venv). Not run in CI: a manual check, as the README says.

    .venv/bin/python scripts/check_onnx_import.py [--models resnet18,...] [--batch 2]
"""

import argparse
import contextlib
import io
import pathlib
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import torch
import torchvision
from safetensors.numpy import load_file, save_file

DEFAULT_MODELS = [
    "resnet18", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "mobilenet_v2",
    "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "mnasnet0_5",
    "densenet121", "squeezenet1_0", "mobilenet_v1",
]
ROOT = pathlib.Path(__file__).resolve().parent.parent


def mobilenet_v1():
    """MobileNetV1 (width 1.0): a 3×3 stride-2 stem, then thirteen
    depthwise 3×3 + pointwise 1×1 pairs, each conv with batch norm and
    ReLU, and a global pool and linear head."""
    nn = torch.nn

    def conv(cin, cout, kernel, stride, groups):
        return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    widths = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
    widths += [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
    layers = conv(3, 32, 3, 2, 1)
    for cin, cout, stride in widths:
        layers += conv(cin, cin, 3, stride, cin) + conv(cin, cout, 1, 1, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))


def seeded(name):
    torch.manual_seed(0)
    build = mobilenet_v1 if name == "mobilenet_v1" else getattr(torchvision.models, name)
    model = build().eval()
    # Non-trivial batch-norm statistics, so a wrong fold shows.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def export(model, x, path, dynamo):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), opset_version=17, dynamo=dynamo,
                          input_names=["input"], output_names=["output"])


def wick(path, x_file, out_file, passes):
    cmd = [str(ROOT / "target/release/xtask"), "run", str(path), "--input", str(x_file),
           "--output", str(out_file), "--passes", passes]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return None, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return load_file(str(out_file))["output"], None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "xtask"], cwd=ROOT, check=True)
    import onnxruntime as ort

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for name in args.models.split(","):
            model = seeded(name)
            torch.manual_seed(1)
            x = torch.randn(args.batch, 3, 224, 224)
            with torch.no_grad():
                want = model.double()(x.double()).numpy()
            model = model.float()
            scale = float(np.abs(want).max())
            x_file = tmp / f"{name}-input.safetensors"
            save_file({"input": x.numpy()}, str(x_file))
            for dynamo in (False, True):
                label = f"{name} ({'dynamo' if dynamo else 'torchscript'})"
                path = tmp / f"{name}-{int(dynamo)}.onnx"
                try:
                    export(model, x, path, dynamo)
                except Exception as e:  # an exporter failure is not wick's
                    print(f"{label:42} export failed: {type(e).__name__}")
                    continue
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                ort_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
                row = [f"{label:42}", f"ort {np.abs(ort_out - want).max() / scale:.1e}"]
                for passes in ("default", "none"):
                    got, error = wick(path, x_file, tmp / "out.safetensors", passes)
                    if got is None:
                        row.append(f"wick {passes}: {error}")
                        failed = True
                        continue
                    diff = np.abs(got.astype(np.float64) - want).max() / scale
                    failed |= not diff <= 1e-4
                    row.append(f"wick {passes} {diff:.1e}")
                print("  ".join(row), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
