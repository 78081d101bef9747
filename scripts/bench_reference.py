"""Times PyTorch eager and ONNX Runtime on ResNet18 with the tutorial's
protocol, for side-by-side comparison with `cargo xtask bench resnet18`
(run both in the same minute on the same machine). Not run by CI.

    .venv/bin/pip install torch torchvision onnx onnxruntime
    .venv/bin/python scripts/bench_reference.py [--batch 10] [--iters 20] [--warmup 10]

Prints median / min / max ms per forward and peak RSS of this process.
"""

import argparse
import pathlib
import resource
import statistics
import tempfile
import time

import numpy as np
import torch
import torchvision


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples), max(samples)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(args.batch, 3, 224, 224)
    rows = []
    with torch.no_grad():
        rows.append(("pytorch-eager", timed(lambda: model(x), args.warmup, args.iters)))
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "resnet18.onnx"
            torch.onnx.export(model, x, str(path), input_names=["input"], output_names=["output"], dynamo=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"input": x.numpy().astype(np.float32)}
            rows.append((f"onnxruntime-{ort.__version__}", timed(lambda: session.run(None, feed), args.warmup, args.iters)))
    except ImportError as err:
        print(f"(onnxruntime not installed: {err})")
    print(f"resnet18 batch {args.batch}, torch {torch.__version__}, {args.warmup} warm-up + {args.iters} timed forwards")
    print(f"{'runtime':<22} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for name, (median, low, high) in rows:
        print(f"{name:<22} {median:>10.2f} {low:>9.2f} {high:>9.2f}")
    print(f"peak RSS of this process (both runtimes): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
