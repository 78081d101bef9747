"""Writes wick's PyTorch reference fixtures into fixtures/ (run once; CI never runs it).

    python -m venv .venv && .venv/bin/pip install torch torchvision safetensors numpy
    .venv/bin/python scripts/make_fixtures.py

* toy / toy-sequential: the tutorial's models exactly, PyTorch's default init
  under a fixed seed, batch-norm running statistics replaced by non-trivial
  values; saved as torch state dicts (names such as `nested.0.running_mean`,
  `wrapped.mod.weight`, `0.weight`, with num_batches_tracked), plus an input
  and PyTorch's output.
* resnet18 (batch 2), resnet34, resnet50, mobilenet_v2, mobilenet_v3_large and
  efficientnet_b0 (batch 1): torchvision's
  architectures with weights from wick's seeded init (scripts/wick_random.py,
  the twin of crates/models/src/random.rs), so the 46-98 MB weights need not
  be committed; input from the same generator; only PyTorch's logits and a
  few probe values are stored.
"""

import pathlib
import sys

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import wick_random  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures"
RESNET_WEIGHT_SEED = 7
RESNET_INPUT_SEED = 11


class WrappedBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.mod = nn.BatchNorm2d(1)

    def forward(self, x):
        return self.mod(x)


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 1)
        self.bn1 = nn.BatchNorm2d(1)
        self.conv2 = nn.Conv2d(1, 1, 1)
        self.nested = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 1, 1))
        self.wrapped = WrappedBatchNorm()

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.conv2(x)
        x = self.nested(x)
        x = self.wrapped(x)
        return x


def randomise_batch_norms(model: nn.Module, generator: torch.Generator):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.3)
            module.num_batches_tracked.fill_(100)


def save_state_dict(model: nn.Module, path: pathlib.Path):
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


@torch.no_grad()
def toy_fixtures():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    models = {
        "toy": (M(), (5, 1, 1, 1)),
        "toy_sequential": (
            nn.Sequential(
                nn.Conv2d(3, 16, 5),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 7),
                nn.BatchNorm2d(32),
            ),
            (2, 3, 28, 28),
        ),
    }
    for name, (model, shape) in models.items():
        randomise_batch_norms(model, generator)
        model.eval()
        x = torch.randn(*shape, generator=generator)
        y = model(x)
        save_state_dict(model, OUT / f"{name}.weights.safetensors")
        save_file({"input": x.contiguous(), "output": y.contiguous()}, str(OUT / f"{name}.io.safetensors"))
        print(f"{name}: input {tuple(x.shape)} output {tuple(y.shape)} |y|max {y.abs().max():.4f}")


@torch.no_grad()
def classifier_fixture(name: str, batch: int):
    import torchvision

    model = getattr(torchvision.models, name)()
    model.load_state_dict(wick_random.random_state_dict(model, RESNET_WEIGHT_SEED))
    model.eval()
    x = wick_random.random_input(RESNET_INPUT_SEED, (batch, 3, 224, 224))
    y = model(x)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    save_file(
        {
            "output": y.contiguous(),
            "probe.input": x.flatten()[:16].contiguous(),
            "probe.first_conv.weight": first_conv.weight.flatten()[:16].contiguous(),
            "meta.seeds": torch.tensor([RESNET_WEIGHT_SEED, RESNET_INPUT_SEED], dtype=torch.int64),
        },
        str(OUT / f"{name}_random.io.safetensors"),
    )
    print(f"{name}: logits {tuple(y.shape)} |y|max {y.abs().max():.4f} torch {torch.__version__}")


def main():
    OUT.mkdir(exist_ok=True)
    torch.set_num_threads(2)
    toy_fixtures()
    classifier_fixture("resnet18", 2)
    classifier_fixture("resnet34", 1)
    classifier_fixture("resnet50", 1)
    classifier_fixture("mobilenet_v2", 1)
    classifier_fixture("mobilenet_v3_large", 1)
    classifier_fixture("efficientnet_b0", 1)


if __name__ == "__main__":
    np.seterr(all="raise")
    main()
