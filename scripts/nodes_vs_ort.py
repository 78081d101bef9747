#!/usr/bin/env python3
"""wick's per-node times beside ONNX Runtime's, for the torchvision ResNets.

Reads the output of `cargo xtask profile MODEL --batch B --top 100` (wick)
and of `scripts/profile_reference.py --model MODEL --batch B --top 100`
(ONNX Runtime's profiler), matches each wick node to the ORT node(s) that
compute the same thing, and prints one line per wick node, largest
difference first, then the totals. Matching: a fused conv (conv + bn
[+ add] + relu) against ORT's fused Conv, which ORT names after the op
whose output it produces (`relu`, `relu_1`, `relu_2` for a block's
conv1..conv3; `convN` itself where the residual add is fused in); the stem
(conv + max pool) against ORT's stem conv plus its max pool; `fc` against
the Gemm, `avgpool` against the global pool. Nodes of other models print with "-" where no ORT node matched.

Usage: scripts/nodes_vs_ort.py WICK_PROFILE.txt ORT_PROFILE.txt
Run the two profiles back to back: on a noisy host compare them only when
their totals agree with a same-minute pair (`scripts/cpu-pairs.sh`).
"""
import math
import sys

WICK_OPS = {"fused_conv2d", "conv2d", "linear", "max_pool2d", "global_avg_pool2d"}


def wick_nodes(path):
    """name -> ms from `xtask profile`'s slowest-nodes table."""
    nodes = {}
    for line in open(path):
        f = line.split()
        if len(f) >= 5 and f[-1].endswith("%") and f[1] in WICK_OPS:
            nodes[f[0]] = float(f[-2])
    return nodes


def ort_nodes(path):
    """name -> ms from profile_reference.py's per-node lines."""
    nodes = {}
    for line in open(path):
        f = line.split()
        if len(f) >= 3 and f[0].startswith("/"):
            try:
                nodes[f[0]] = nodes.get(f[0], 0.0) + float(f[-1])
            except ValueError:
                pass
    return nodes


def ort_names(node):
    """The ORT node names that compute wick's fused `node`."""
    base = node.split("+")[0]
    if base == "conv1":
        return ["/relu/Relu_output_0_nchwc", "/maxpool/MaxPool_output_0_nchwc"]
    if base == "fc":
        return ["/fc/Gemm"]
    if base == "avgpool":
        return ["/avgpool/GlobalAveragePool_output_0_nchwc"]
    parts = base.split(".")
    if len(parts) < 3:
        return []
    prefix = f"/{parts[0]}/{parts[0]}.{parts[1]}/"
    conv = parts[2]
    if conv == "downsample":
        return [prefix + "downsample/downsample.0/Conv_output_0_nchwc"]
    if "add" in node.split("+"):
        return [prefix + conv + "/Conv_output_0_nchwc"]
    relu = {"conv1": "relu", "conv2": "relu_1", "conv3": "relu_2"}.get(conv)
    return [prefix + relu + "/Relu_output_0_nchwc"] if relu else []


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wick, ort = wick_nodes(sys.argv[1]), ort_nodes(sys.argv[2])
    rows, total_wick, total_ort = [], 0.0, 0.0
    for node, ms in wick.items():
        names = ort_names(node)
        theirs = sum(ort[n] for n in names) if names and all(n in ort for n in names) else math.nan
        rows.append((ms, theirs, node))
        total_wick += ms
        if not math.isnan(theirs):
            total_ort += theirs
    rows.sort(key=lambda r: -(r[0] - r[1]) if not math.isnan(r[1]) else math.inf)
    for ms, theirs, node in rows:
        if math.isnan(theirs):
            print(f"{node:36s} wick {ms:8.3f} ort        -")
        else:
            print(f"{node:36s} wick {ms:8.3f} ort {theirs:8.3f} diff {ms - theirs:+8.3f} ratio {ms / theirs:5.2f}")
    print(f"total wick {total_wick:.2f} ms, ORT {total_ort:.2f} ms (matched nodes)")


if __name__ == "__main__":
    main()
