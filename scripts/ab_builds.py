#!/usr/bin/env python3
"""Two builds of wick (or one build under two environments) timed side by
side in one run: each as a `xtask chunks` process, taking turns a chunk of
forwards at a time, so a host whose speed drifts between minutes slows
both alike. Not run by CI.

    .venv/bin/python scripts/ab_builds.py --a target-old/release/xtask --b target/release/xtask mobilenet-v2 --batch 1
    .venv/bin/python scripts/ab_builds.py --a target/release/xtask --b-env WICK_ISA=avx2 resnet18 --batch 10 --rounds 12 --chunk 2

MODEL is what `xtask chunks` takes (a model name or an ONNX file). `--b`
defaults to `--a`; `--a-env` / `--b-env` add `KEY=VALUE` settings to that
side's environment (repeatable). Prints each side's median and min ms per
forward over all its chunks, and the median over rounds of B's chunk
median over A's (with the quartiles of those per-round ratios): the
figure to read. Two runs of the same build read 0.99-1.01 on the 2-core
Zen 4 VM; a minute when the host is slow (MobileNetV2 b1 at 5.5 ms
instead of 3.7) can move it by a few percent, so look at the medians too.
The chunk protocol's client is `bench_reference.py`'s (`Chunked`).
"""

import argparse
import os
import statistics

from bench_reference import Chunked


def start(name, binary, model, batch, env):
    """A `chunks` process, its model compiled and ready for chunks."""
    try:
        return Chunked(name, [binary, "chunks", model, "--batch", str(batch)], dict(os.environ, **env))
    except OSError as e:
        raise SystemExit(f"cannot run {binary}: {e}") from None


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
    a_env, b_env = settings(args.a_env), settings(args.b_env)
    a = start("A", args.a, args.model, args.batch, a_env)
    b = start("B", args.b or args.a, args.model, args.batch, b_env)
    for side in (a, b):
        side.chunk(args.warmup)
    ratios = []
    for r in range(args.rounds):
        got = {}
        # Each side first in every other round.
        for side in (a, b) if r % 2 == 0 else (b, a):
            got[side.name] = side.chunk(args.chunk)
            side.times += got[side.name]
        ratios.append(statistics.median(got["B"]) / statistics.median(got["A"]))
    for side in (a, b):
        side.close()
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(
        f"{args.model} batch {args.batch}, {args.rounds} rounds of {args.chunk} forwards: "
        f"A median {statistics.median(a.times):.3f} ms (min {min(a.times):.3f}), "
        f"B median {statistics.median(b.times):.3f} ms (min {min(b.times):.3f}); "
        f"B/A per round median {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f}); "
        f"peak RSS A {a.rss:.0f} / B {b.rss:.0f} MiB"
    )


if __name__ == "__main__":
    main()
