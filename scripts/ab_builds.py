#!/usr/bin/env python3
"""Two builds of wick (or one build under two environments) timed side by
side in one run: each as a `xtask chunks` process, taking turns a chunk of
forwards at a time, so a host whose speed drifts between minutes slows
both alike. Not run by CI.

    python3 scripts/ab_builds.py --a target-old/release/xtask --b target/release/xtask mobilenet-v2 --batch 1
    python3 scripts/ab_builds.py --a target/release/xtask --b-env WICK_ISA=avx2 resnet18 --batch 10 --rounds 12 --chunk 2

MODEL is what `xtask chunks` takes (a model name or an ONNX file). `--b`
defaults to `--a`; `--a-env` / `--b-env` add `KEY=VALUE` settings to that
side's environment (repeatable). Prints each side's median and min ms per
forward over all its chunks, and the median over rounds of B's chunk
median over A's (with the quartiles of those per-round ratios): the
figure to read. Two runs of the same build read 0.99-1.01 on the 2-core
Zen 4 VM; a minute when the host is slow (MobileNetV2 b1 at 5.5 ms
instead of 3.7) can move it by a few percent, so look at the medians too.
"""

import argparse
import os
import statistics
import subprocess


def start(binary, model, batch, env):
    """A `chunks` process, its model compiled and ready for chunks."""
    try:
        return subprocess.Popen(
            [binary, "chunks", model, "--batch", str(batch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ, **env),
        )
    except OSError as e:
        raise SystemExit(f"cannot run {binary}: {e}") from None


def chunk(process, forwards):
    """Runs `forwards` forwards in `process`; their times in ms."""
    process.stdin.write(f"{forwards}\n")
    process.stdin.flush()
    line = process.stdout.readline()
    if not line:
        raise SystemExit("a chunks process ended early (run it by hand to see why)")
    return [float(t) for t in line.split()]


def settings(pairs):
    """`KEY=VALUE` strings as a dict."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"not KEY=VALUE: {pair!r}")
        out[key] = value
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model name or ONNX file, as `xtask chunks` takes it")
    parser.add_argument("--a", required=True, help="build A's xtask binary")
    parser.add_argument("--b", help="build B's xtask binary (default: A's)")
    parser.add_argument("--a-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--b-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=24, help="chunks per side")
    parser.add_argument("--chunk", type=int, default=20, help="forwards per chunk")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forwards per side first")
    args = parser.parse_args()
    if args.rounds < 4 or args.chunk < 1:
        raise SystemExit("--rounds must be at least 4 and --chunk at least 1")
    a = start(args.a, args.model, args.batch, settings(args.a_env))
    b = start(args.b or args.a, args.model, args.batch, settings(args.b_env))
    for process in (a, b):
        chunk(process, args.warmup)
    times = {a: [], b: []}
    ratios = []
    for r in range(args.rounds):
        got = {}
        # Each side first in every other round.
        for process in (a, b) if r % 2 == 0 else (b, a):
            got[process] = chunk(process, args.chunk)
        for process in (a, b):
            times[process] += got[process]
        ratios.append(statistics.median(got[b]) / statistics.median(got[a]))
    for process in (a, b):
        process.stdin.write("q\n")
        process.stdin.flush()
        process.communicate()
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(
        f"{args.model} batch {args.batch}, {args.rounds} rounds of {args.chunk} forwards: "
        f"A median {statistics.median(times[a]):.3f} ms (min {min(times[a]):.3f}), "
        f"B median {statistics.median(times[b]):.3f} ms (min {min(times[b]):.3f}); "
        f"B/A per round median {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f})"
    )


if __name__ == "__main__":
    main()
