#!/usr/bin/env python3
"""Writes the ONNX import fixtures into fixtures/onnx/ (run once; CI never runs it).

    .venv/bin/pip install torch torchvision onnx onnxscript safetensors numpy
    .venv/bin/python scripts/make_onnx_fixtures.py

* tiny_torchscript.onnx, tiny_dynamo.onnx (+ .onnx.data, the dynamo
  exporter's external weights): a small CNN using every operator family the
  importer lowers (conv + batch norm + ReLU, max pool, depthwise conv +
  ReLU6 (Clip), hardswish, squeeze-and-excitation (mean, 1x1 convs,
  hardsigmoid, broadcast Mul), SiLU (Sigmoid * x), residual Add, channel
  Concat, average pool, ceil-mode max pool, flatten, linear), PyTorch's default init under a fixed seed with non-trivial
  batch-norm statistics, exported by both of torch's exporters at opset 17
  with a symbolic batch; tiny.io.safetensors holds an input of batch 2 and
  PyTorch's float64 output.
* resnet18_structure.onnx: torchvision's ResNet18 exported by the
  TorchScript exporter with batch norms kept (training=PRESERVE, no constant
  folding) with wick's seeded weights, then its initializers' data removed
  (names, types and shapes kept): 46 MB of weights are not committed. The test fills them from
  wick's seeded init (scripts/wick_random.py's twin) and checks against
  fixtures/resnet18_random.io.safetensors, and checks the fused graph and
  pass counts against the traced model.
"""

import contextlib
import io
import pathlib
import warnings

import sys

import onnx
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import wick_random  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "onnx"
# make_fixtures.py's seed for resnet18_random.io.safetensors.
RESNET_WEIGHT_SEED = 7


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.branch = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
        self.avg = nn.AvgPool2d(2, stride=2)
        self.ceil_pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.head = nn.Sequential(nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12), nn.SiLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool(self.stem(x))
        y = self.expand(self.dw(x))
        s = torch.nn.functional.adaptive_avg_pool2d(y, 1)
        s = torch.nn.functional.hardsigmoid(self.se_expand(torch.relu(self.se_reduce(s))))
        y = self.project(y * s)
        x = x + y
        # DenseNet's join and transition, SqueezeNet's ceil-mode pool.
        x = self.ceil_pool(self.avg(torch.cat([x, self.branch(x)], 1)))
        x = self.head(x)
        x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def statistics(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


def export(model, x, path, **kwargs):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), opset_version=17, input_names=["input"],
                          output_names=["output"], **kwargs)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tiny = Tiny().eval()
    statistics(tiny)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = tiny.double()(x.double())
    tiny = tiny.float()
    save_file({"input": x.contiguous(), "output": want.contiguous()}, str(OUT / "tiny.io.safetensors"))
    batch = {"input": {0: "batch"}, "output": {0: "batch"}}
    export(tiny, x, OUT / "tiny_torchscript.onnx", dynamo=False, dynamic_axes=batch)
    export(tiny, x, OUT / "tiny_dynamo.onnx", dynamo=True,
           dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
    # The dynamo exporter keeps small weights inline; store them beside the
    # file, as it does for real models, so the fixture covers external data.
    model = onnx.load(str(OUT / "tiny_dynamo.onnx"))
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="tiny_dynamo.onnx.data", size_threshold=0)
    onnx.save(model, str(OUT / "tiny_dynamo.onnx"))

    # wick's seeded weights: every tensor distinct, so the exporter
    # deduplicates none (with torchvision's init all running variances are
    # ones, and it shares one initializer among them), and each stripped
    # initializer is refilled by its own name.
    resnet = torchvision.models.resnet18().eval()
    resnet.load_state_dict(wick_random.random_state_dict(resnet, RESNET_WEIGHT_SEED))
    path = OUT / "resnet18_structure.onnx"
    export(resnet, torch.randn(1, 3, 224, 224), path, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
           do_constant_folding=False, dynamic_axes=batch)
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("float_data")
    onnx.save(model, str(path))
    for f in sorted(OUT.iterdir()):
        print(f"{f.name}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
