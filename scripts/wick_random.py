"""Python twin of wick's deterministic random init (crates/models/src/random.rs).

Each tensor gets its own SplitMix64 stream seeded with seed ^ fnv1a64(name);
element k is lo + (hi - lo) * u_k in float64, rounded to float32, with
u_k = (z_k >> 40) / 2**24. Vectorised with numpy; bit-identical to Rust.
"""

import numpy as np

MASK = (1 << 64) - 1


def fnv1a64(name: str) -> int:
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK
    return h


def splitmix64(state: int, count: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        k = np.arange(1, count + 1, dtype=np.uint64)
        z = np.uint64(state) + k * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(seed: int, name: str, shape, lo: float, hi: float) -> np.ndarray:
    count = int(np.prod(shape)) if len(shape) else 1
    z = splitmix64(seed ^ fnv1a64(name), count)
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return (lo + (hi - lo) * u).astype(np.float32).reshape(shape)


def init_range(module, leaf: str):
    """The interval of ParamKind::init_range for parameter `leaf` of a torch module."""
    import torch.nn as nn

    if isinstance(module, nn.BatchNorm2d):
        return {"running_mean": (-0.2, 0.2), "bias": (-0.2, 0.2), "running_var": (0.5, 1.5), "weight": (0.4, 0.9)}[leaf]
    if isinstance(module, nn.Conv2d):
        fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        bound = np.sqrt(6.0 / fan_in) if leaf == "weight" else 1.0 / np.sqrt(fan_in)
        return (-bound, bound)
    if isinstance(module, nn.Linear):
        bound = 1.0 / np.sqrt(module.in_features)
        return (-bound, bound)
    raise ValueError(f"no init rule for {type(module).__name__}.{leaf}")


def random_state_dict(model, seed: int):
    """A state dict for `model` drawn from wick's init (num_batches_tracked kept as is)."""
    import torch

    modules = dict(model.named_modules())
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            out[name] = tensor
            continue
        owner, leaf = name.rsplit(".", 1)
        lo, hi = init_range(modules[owner], leaf)
        out[name] = torch.from_numpy(uniform(seed, name, tuple(tensor.shape), lo, hi))
    return out


def random_input(seed: int, shape):
    import torch

    return torch.from_numpy(uniform(seed, "input", tuple(shape), -1.0, 1.0))
