"""Times PyTorch eager torchvision models (ResNet18 by default) on a CUDA GPU with the protocol of `cargo
xtask bench` (warm-up forwards, then timed forwards, each followed by a
device synchronisation), for side-by-side comparison with `xtask bench
resnet18 --device cuda` in the same run of scripts/gpu-check.sh. Not run by
CI; needs torch + torchvision with CUDA (the GPU machine's python3 has them).

    python3 scripts/bench_reference_gpu.py [--batch 10 64] [--iters 20] [--warmup 10] [--json FILE]

Two fp32 rows: `pytorch-eager-fp32` with TF32 off (true fp32 arithmetic, as
candle's cuBLAS GEMMs do by default) and `pytorch-eager-tf32` with PyTorch's
cuDNN default (TF32 convolutions on Ampere and later), so the reader sees
what precision each number bought. Prints median / min / max ms per forward.
"""

import argparse
import json
import statistics
import time


def timed(fn, sync, warmup, iters):
    for _ in range(warmup):
        fn()
        sync()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="+", default=["resnet18"])
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 64])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", help="also write the results as JSON")
    args = parser.parse_args()
    import torch
    import torchvision

    device = torch.device("cuda")
    results = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "warmup": args.warmup,
        "iters": args.iters,
        "rows": [],
    }
    for model_name in args.model:
        model = getattr(torchvision.models, model_name.replace("-", "_"))().eval().to(device)
        for batch in args.batch:
            x = torch.randn(batch, 3, 224, 224, device=device)
            for name, tf32 in (("pytorch-eager-fp32", False), ("pytorch-eager-tf32", True)):
                torch.backends.cudnn.allow_tf32 = tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                with torch.no_grad():
                    row = timed(lambda: model(x), torch.cuda.synchronize, args.warmup, args.iters)
                results["rows"].append({"model": model_name, "runtime": name, "batch": batch, **row})
    print(f"{', '.join(args.model)} on {results['device']}, torch {results['torch']}, cuDNN {results['cudnn']}, "
          f"{args.warmup} warm-up + {args.iters} timed forwards")
    print(f"{'model':<20} {'runtime':<20} {'batch':>5} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for r in results["rows"]:
        print(f"{r['model']:<20} {r['runtime']:<20} {r['batch']:>5} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f} "
              f"{r['max_ms']:>9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
