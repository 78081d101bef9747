"""Times PyTorch eager, ONNX Runtime and OpenVINO's CPU plugin on a
torchvision classifier (ResNet18 by default) with the tutorial's protocol,
for side-by-side comparison with `cargo xtask bench MODEL` (run both in the
same minute on the same machine). Not run by CI.

    .venv/bin/pip install torch torchvision onnx onnxruntime openvino
    .venv/bin/python scripts/bench_reference.py [--model resnet50] [--batch 10] [--iters 20] [--warmup 10]
    .venv/bin/python scripts/bench_reference.py --onnx model.onnx [--batch 10]   # a user's file, as `cargo xtask bench model.onnx`

Both ONNX runtimes get the same exported file and 2 threads; OpenVINO runs
f32 inference precision with the LATENCY hint. With `--isa avx2` both
also run a second time held to AVX2 + FMA, the same-machine references for
wick's forced AVX2 path (`WICK_ISA=avx2`) on an AVX-512 CPU: ONNX Runtime
under `scripts/avx2only.c` (an LD_PRELOAD shim, built here with `cc`, that
hides AVX-512 and AMX from CPUID, so MLAS picks its AVX2 kernels as on an
AVX2-only CPU; the child checks that numpy, loaded in the same process,
sees AVX2 and no AVX-512F, else fails), OpenVINO with oneDNN's
ONEDNN_MAX_CPU_ISA (which its CPU plugin honours: the child checks that
every convolution's kernel is an AVX2 one, else fails; its global pooling
and fully connected layer still run their own paths). Prints median / min / max ms
per forward and each runtime's peak RSS: ONNX Runtime and OpenVINO each run
in a child process of their own (as each `cargo xtask bench` mode does), so
their figures are theirs alone; PyTorch's is this process.

With `--interleave ROUNDS`, wick runs beside them in the same run: ONNX
Runtime, OpenVINO and wick (`cargo xtask chunks`, or `--xtask BIN`) each
wait in a process of their own and take turns, ROUNDS rounds of one chunk
each (about `--chunk-ms` of forwards, the order rotating from round to
round, a short pause between chunks so that no runtime's spinning threads
run into the next one's chunk); PyTorch is skipped. It prints each
runtime's median / min / max over all its forwards and peak RSS, then
wick's ratio to ONNX Runtime and to the faster runtime in each round (the
rounds' median, min and max): on a host whose speed drifts between
minutes, chunks a few hundred milliseconds apart see the same host.

    .venv/bin/python scripts/bench_reference.py --model mobilenet_v3_large --batch 1 --interleave 12 --xtask target/release/xtask [--wick-isa avx2 --isa avx2]
"""

import argparse
import os
import pathlib
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


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
    parser.add_argument("--model", default="resnet18", help="a torchvision.models constructor: resnet18, resnet34, resnet50, mobilenet_v2, ... (or wick's spelling, mobilenet-v2)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--onnx", help="time this ONNX file (ONNX Runtime and OpenVINO only; a symbolic batch is --batch)")
    parser.add_argument("--isa", choices=["avx2"], help="also time ONNX Runtime and OpenVINO held to this instruction set")
    parser.add_argument(
        "--child", choices=["onnxruntime", "openvino", "onnxruntime-avx2", "openvino-avx2"], help=argparse.SUPPRESS
    )
    parser.add_argument("--interleave", type=int, metavar="ROUNDS",
                        help="time ONNX Runtime, OpenVINO and wick in turns, ROUNDS chunks each (see above)")
    parser.add_argument("--chunk-ms", type=float, default=300.0, help="about how long each chunk runs (--interleave)")
    parser.add_argument("--xtask", default="cargo xtask", help="the command that runs `xtask chunks` (--interleave)")
    parser.add_argument("--wick-isa", choices=["avx512", "avx2", "scalar"], help="WICK_ISA for wick's process (--interleave)")
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = torchvision_name(args.model)
    if args.child:
        return runtime_child(args.child, args.dir, args.warmup, args.iters, args.file, args.serve)
    if args.interleave:
        return interleave(args)
    if args.onnx:
        return time_file(args)
    import torch  # not in the ORT child: its peak RSS must be ORT's alone
    import torchvision

    torch.set_num_threads(2)
    model = getattr(torchvision.models, args.model)().eval()
    x = torch.randn(args.batch, 3, 224, 224)
    rows = []
    with torch.no_grad():
        rows.append(("pytorch-eager", timed(lambda: model(x), args.warmup, args.iters)))
    torch_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, x, tmp)
        rows_child, child_rss = run_children(tmp, args, None)
        rows += rows_child
    print(f"{args.model} batch {args.batch}, torch {torch.__version__}, {args.warmup} warm-up + {args.iters} timed forwards")
    print_rows(rows)
    print(f"peak RSS: pytorch-eager process {torch_rss:.0f} MiB" + "".join(f", {r}" for r in child_rss))


def torchvision_name(model):
    """A zoo model's torchvision constructor name, given wick's spelling (mobilenet-v2) or torchvision's."""
    return model.replace("-", "_")


def installed_runtimes(args):
    """(runtime, module, isa, name) of each installed ONNX runtime, with
    the held-back ones `--isa` asks for; a missing one is said and skipped."""
    runtimes = ["onnxruntime", "openvino"]
    if args.isa:
        runtimes += [f"onnxruntime-{args.isa}", f"openvino-{args.isa}"]
    for runtime in runtimes:
        module, _, isa = runtime.partition("-")
        try:
            version = __import__(module).__version__.split("-")[0]
        except ImportError as err:
            print(f"({module} not installed: {err})")
            continue
        yield runtime, module, isa, f"{module}-{version}" + (f"-{isa}" if isa else "")


def export_model(model, x, tmp):
    """`model` (torch) exported to tmp/model.onnx on input `x`, saved as tmp/input.npy."""
    import torch

    torch.onnx.export(model, x, str(pathlib.Path(tmp) / "model.onnx"), input_names=["input"],
                      output_names=["output"], dynamo=False)
    np.save(pathlib.Path(tmp) / "input.npy", x.numpy().astype(np.float32))


def file_input(path, batch):
    """A seeded random input of the ONNX file's declared shape (a symbolic
    first dimension is `batch`)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    (first,) = [i for i in graph.input if i.name not in initializers]
    shape = [d.dim_value if d.HasField("dim_value") else batch for d in first.type.tensor_type.shape.dim]
    return np.random.default_rng(1).standard_normal(shape, dtype=np.float32)


def run_children(tmp, args, file):
    """Each installed ONNX runtime in a child process of its own, on
    `file` (else the exported tmp/model.onnx) and tmp/input.npy."""
    rows, child_rss = [], []
    for runtime, module, isa, name in installed_runtimes(args):
        command = [sys.executable, __file__, "--child", runtime, "--dir", tmp,
                   "--warmup", str(args.warmup), "--iters", str(args.iters)]
        if file:
            command += ["--file", file]
        env, failure = held_back(module, isa, tmp)
        child = None if failure else subprocess.run(command, capture_output=True, text=True, env=env)
        if child and child.returncode != 0 and isa:
            failure = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        if failure:
            # A held-back run that cannot be had here (no CPUID faulting,
            # no cc): say so, and keep the other rows.
            print(f"({name} not timed: {failure})")
            continue
        if child.returncode != 0:
            sys.exit(f"{name} child failed: {child.stderr.strip()}")
        median, low, high, rss = map(float, child.stdout.split())
        rows.append((name, (median, low, high)))
        child_rss.append(f"{name} child process {rss:.0f} MiB")
    return rows, child_rss


def held_back(module, isa, tmp):
    """The environment of `module`'s child held to `isa` (None: its best
    path), or why it cannot be had: (env, None) or (None, reason)."""
    if not isa:
        return None, None
    if module == "onnxruntime":
        shim, failure = avx2_shim(tmp)
        return (None, failure) if failure else (dict(os.environ, LD_PRELOAD=shim), None)
    return dict(os.environ, ONEDNN_MAX_CPU_ISA=isa.upper()), None


def avx2_shim(tmp):
    """scripts/avx2only.c built into `tmp` with `cc`: (its path, None), or
    (None, why not)."""
    source = pathlib.Path(__file__).with_name("avx2only.c")
    library = pathlib.Path(tmp) / "avx2only.so"
    if not library.exists():
        try:
            build = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)],
                                   capture_output=True, text=True)
        except OSError as err:
            return None, f"cannot build {source.name}: {err}"
        if build.returncode != 0:
            return None, f"cannot build {source.name}: {build.stderr.strip()}"
    return str(library), None


def check_cpuid_masked():
    """Fails unless this process sees AVX2 + FMA and no AVX-512F through
    CPUID (numpy's run-time dispatch reads it, as MLAS does)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    if features.get("AVX512F") or not (features.get("AVX2") and features.get("FMA3")):
        sys.exit(f"CPUID not masked to AVX2 (AVX512F {features.get('AVX512F')}, AVX2 {features.get('AVX2')})")


def print_rows(rows):
    print(f"{'runtime':<22} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for name, (median, low, high) in rows:
        print(f"{name:<22} {median:>10.2f} {low:>9.2f} {high:>9.2f}")


def time_file(args):
    """ONNX Runtime and OpenVINO on a given file, an input of its declared
    shape (a symbolic first dimension is --batch), each in its own process."""
    x = file_input(args.onnx, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(pathlib.Path(tmp) / "input.npy", x)
        rows, child_rss = run_children(tmp, args, str(pathlib.Path(args.onnx).resolve()))
    print(f"{args.onnx} input {list(x.shape)}, {args.warmup} warm-up + {args.iters} timed forwards")
    print_rows(rows)
    print("peak RSS: " + ", ".join(child_rss))


def runtime_child(runtime, directory, warmup, iters, file=None, serve=False):
    """Times one ONNX runtime on the exported model in a process that never
    imported torch; with `serve`, in chunks asked for on stdin instead
    (`serve_chunks`)."""
    model = file or str(pathlib.Path(directory) / "model.onnx")
    x = np.load(pathlib.Path(directory) / "input.npy")
    if runtime.startswith("onnxruntime"):
        if runtime == "onnxruntime-avx2":
            check_cpuid_masked()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        run = lambda: session.run(None, {name: x})
    else:
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": "2", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        compiled = ov.Core().compile_model(model, "CPU", config)
        if runtime == "openvino-avx2":
            check_avx2(compiled)
        request = compiled.create_infer_request()
        run = lambda: request.infer({0: x})
    if serve:
        return serve_chunks(run)
    median, low, high = timed(run, warmup, iters)
    print(median, low, high, peak_rss_mib())


def peak_rss_mib():
    """This process's peak RSS (VmHWM, not ru_maxrss: Linux carries the
    parent's maxrss across fork + exec)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024


def serve_chunks(run):
    """The protocol of `cargo xtask chunks`: each stdin line a count N, answered
    with N forwards' ms on one line; `q`, a blank line or the end ends it,
    after a line `rss MiB`."""
    for line in sys.stdin:
        if line.strip() in ("", "q"):
            break
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        print(" ".join(f"{t:.4f}" for t in times), flush=True)
    print(f"rss {peak_rss_mib():.1f}", flush=True)


class Chunked:
    """A runtime waiting in a child process for chunk requests."""

    def __init__(self, name, command, env=None):
        self.name = name
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.times, self.rounds, self.rss = [], [], float("nan")

    def chunk(self, n):
        self.process.stdin.write(f"{n}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"{self.name} stopped (exit status {self.process.wait()})")
        return [float(t) for t in line.split()]

    def close(self):
        self.process.stdin.write("q\n")
        self.process.stdin.flush()
        last = self.process.stdout.readline().split()
        if len(last) == 2 and last[0] == "rss":
            self.rss = float(last[1])
        self.process.wait()


def interleave(args):
    """ONNX Runtime, OpenVINO and wick in turns on one model (see the module doc)."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.onnx:
            file = wick_model = str(pathlib.Path(args.onnx).resolve())
            np.save(pathlib.Path(tmp) / "input.npy", file_input(file, args.batch))
        else:
            import torch
            import torchvision

            file, wick_model = None, args.model.replace("_", "-")
            export_model(getattr(torchvision.models, args.model)().eval(), torch.randn(args.batch, 3, 224, 224), tmp)
        engines = []
        for runtime, module, isa, name in installed_runtimes(args):
            env, failure = held_back(module, isa, tmp)
            if failure:
                print(f"({name} not timed: {failure})")
                continue
            command = [sys.executable, __file__, "--child", runtime, "--dir", tmp, "--serve"] + (["--file", file] if file else [])
            engines.append(Chunked(name, command, env))
        wick_env = dict(os.environ, WICK_ISA=args.wick_isa) if args.wick_isa else None
        wick_name = "wick" + (f"-{args.wick_isa}" if args.wick_isa else "")
        engines.append(Chunked(wick_name, shlex.split(args.xtask) + ["chunks", wick_model, "--batch", str(args.batch)], wick_env))
        # Warm-up, then a chunk as long that sizes each runtime's first
        # chunk (the first forwards of a session are slower); later chunks
        # are sized from the median of the forwards timed so far, so that a
        # slow warm-up does not leave one runtime with short chunks.
        def size(times_ms):
            return max(1, round(args.chunk_ms / max(statistics.median(times_ms), 1e-3)))

        sizes = {}
        for engine in engines:
            engine.chunk(max(args.warmup, 1))
            sizes[engine.name] = size(engine.chunk(max(args.warmup, 1)))
        for r in range(args.interleave):
            for engine in engines[r % len(engines):] + engines[:r % len(engines)]:
                times = engine.chunk(sizes[engine.name])
                engine.times += times
                engine.rounds.append(statistics.median(times))
                sizes[engine.name] = size(engine.times)
                time.sleep(0.05)
        for engine in engines:
            engine.close()
    print(f"{args.model if not args.onnx else args.onnx} batch {args.batch}, interleaved: {args.interleave} rounds, "
          + ", ".join(f"{e.name} {sizes[e.name]} forwards a chunk at the end" for e in engines))
    print_rows([(e.name, (statistics.median(e.times), min(e.times), max(e.times))) for e in engines])
    # wick's process also builds and traces the model (`bench` reports its engine's alone).
    print("peak RSS: " + ", ".join(f"{e.name} child process {e.rss:.0f} MiB" for e in engines))
    wick = engines[-1]
    references = [e for e in engines[:-1] if e.name.endswith(f"-{args.isa}") == bool(args.wick_isa and args.isa)]
    ort = [e for e in references if e.name.startswith("onnxruntime")]
    for label, rows in [("ORT", ort), ("the faster of ORT and OV", references)]:
        if not rows:
            continue
        ratios = [w / min(e.rounds[r] for e in rows) for r, w in enumerate(wick.rounds)]
        print(f"ratio per round: {wick.name} / {label} median {statistics.median(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f} ({len(ratios)} rounds)")


def check_avx2(compiled):
    """Fails unless every convolution (grouped and depthwise included) of
    OpenVINO's compiled model runs an AVX2 kernel (its runtime model names
    each layer's primitive)."""
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind, primitive = info["layerType"].astype(str), info["primitiveType"].astype(str)
        if kind in ("Convolution", "GroupConvolution") and "avx2" not in primitive:
            sys.exit(f"OpenVINO ran {op.get_friendly_name()} with {primitive}, not AVX2: ONEDNN_MAX_CPU_ISA ignored")


if __name__ == "__main__":
    main()
