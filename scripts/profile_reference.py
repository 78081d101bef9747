"""Per-node time of ONNX Runtime or OpenVINO on a torchvision classifier,
to set beside `cargo xtask profile MODEL --batch N` when looking for where
wick's time goes. Not run by CI.

    .venv/bin/python scripts/profile_reference.py --model mobilenet_v3_large [--batch 10] [--iters 20] [--top 30] [--runtime openvino [--isa avx2]] [--threads 1]

Exports the model as `scripts/bench_reference.py` does, runs ONNX Runtime
(2 intra-op threads, or `--threads`; default graph optimisations) with its
profiler on, or OpenVINO's CPU plugin (as many threads, f32, LATENCY hint,
performance counters on), and prints the mean ms per forward of each fused
node, slowest first, and the totals per operator kind (OpenVINO: per layer type, with the
kernel it chose in the node list). `--isa avx2` holds either to AVX2 + FMA
as `bench_reference.py --isa avx2` does (ONNX Runtime: this script runs
again under the `scripts/avx2only.c` shim, which hides AVX-512 from CPUID;
OpenVINO: ONEDNN_MAX_CPU_ISA, the kernel column showing what each layer
ran), beside `WICK_ISA=avx2 cargo xtask profile`. `--threads 1` beside
`RAYON_NUM_THREADS=1 cargo xtask profile` compares the kernels without
their threading. Model names take wick's spelling too (`mobilenet-v2`).
"""

import argparse
import collections
import json
import os
import pathlib
import sys
import tempfile


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime")
    parser.add_argument("--isa", choices=["avx2"], help="hold the runtime to this instruction set")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (wick: RAYON_NUM_THREADS)")
    args = parser.parse_args()
    from bench_reference import torchvision_name

    args.model = torchvision_name(args.model)
    if args.isa and args.runtime == "onnxruntime":
        from bench_reference import avx2_shim, check_cpuid_masked

        if "avx2only" not in os.environ.get("LD_PRELOAD", ""):
            # The shim must be loaded as the process starts: run again under it.
            shim, failure = avx2_shim(tempfile.mkdtemp(prefix="wick-avx2only-"))
            if failure:
                sys.exit(failure)
            os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, LD_PRELOAD=shim))
        check_cpuid_masked()
    elif args.isa:
        # Read by OpenVINO's oneDNN when it loads: before the import.
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.isa.upper()
    import numpy as np
    import torch
    import torchvision

    model = getattr(torchvision.models, args.model)().eval()
    x = torch.randn(args.batch, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.onnx"
        torch.onnx.export(model, x, str(path), input_names=["input"], output_names=["output"], dynamo=False)
        feed = {"input": x.numpy().astype(np.float32)}
        profile = profile_openvino if args.runtime == "openvino" else profile_onnxruntime
        version, means, kinds = profile(path, feed, args, tmp)
    report(args, version, means, kinds)


def profile_onnxruntime(path, feed, args, tmp):
    """Mean ms per forward of each node, its operator kind, ORT's version."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    warm = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(args.warmup):
        warm.run(None, feed)
    options.enable_profiling = True
    options.profile_file_prefix = str(pathlib.Path(tmp) / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(args.warmup):
        session.run(None, feed)
    for _ in range(args.iters):
        session.run(None, feed)
    events = json.loads(pathlib.Path(session.end_profiling()).read_text())
    per_node = collections.defaultdict(list)
    kinds = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        name = event["name"][: -len("_kernel_time")]
        per_node[name].append(event["dur"] / 1e3)
        kinds[name] = event["args"].get("op_name", "?")
    # The first `warmup` calls of the profiled session are discarded.
    means = {name: sum(d[args.warmup :]) / max(1, len(d) - args.warmup) for name, d in per_node.items()}
    return f"onnxruntime {ort.__version__}", means, kinds


def profile_openvino(path, feed, args, _tmp):
    """Mean ms per forward of each executed layer, its type and kernel, OpenVINO's version."""
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": args.threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "PERF_COUNT": True,
    }
    request = core.compile_model(str(path), "CPU", config).create_infer_request()
    x = feed["input"]
    for _ in range(args.warmup):
        request.infer({0: x})
    sums = collections.defaultdict(float)
    kinds = {}
    for _ in range(args.iters):
        request.infer({0: x})
        for info in request.profiling_info:
            if info.status != info.Status.EXECUTED:
                continue
            sums[info.node_name] += info.real_time.total_seconds() * 1e3
            kinds[info.node_name] = f"{info.node_type} {info.exec_type}"
    means = {name: ms / args.iters for name, ms in sums.items()}
    return f"openvino {ov.__version__}", means, kinds


def report(args, version, means, kinds):
    """The totals per kind, then the slowest nodes."""
    total = sum(means.values())
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    for name, ms in means.items():
        by_kind[kinds[name]][0] += 1
        by_kind[kinds[name]][1] += ms
    held = f" held to {args.isa}" if args.isa else ""
    print(
        f"{args.model} batch {args.batch}, {version}{held}, {args.threads} threads, {args.iters} profiled forwards, "
        f"{total:.3f} ms of node time per forward"
    )
    for kind, (count, ms) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"{kind:<40}{count:>4}{ms:>10.3f}{100 * ms / max(total, 1e-9):>7.1f}%")
    print()
    for name, ms in sorted(means.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{name:<60} {kinds[name]:<40}{ms:>9.3f}")


if __name__ == "__main__":
    main()
