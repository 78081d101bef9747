#!/usr/bin/env bash
# Per-node A/B of two wick builds on one model: `xtask profile` runs of
# build A and build B in A B B A order (a drift of the host over the
# minutes cancels to first order), then each node's time in each build (the
# mean of its middle half of runs) and the ratio B / A, sorted.
#
# On a noisy host whole forwards swing by more than most changes; read a
# change's nodes against the median ratio of all nodes (printed first): the
# nodes a change does not touch move with the host, so a touched node's
# ratio means something only relative to that median.
#
# Usage: scripts/ab-nodes.sh XTASK_A XTASK_B MODEL BATCH [ITERS] [ROUNDS]
#   XTASK_A, XTASK_B  two `xtask` binaries (copy target/release/xtask aside
#                     after building each variant)
#   ITERS             profiled forwards per run (default 50)
#   ROUNDS            A B B A rounds (default 2)
# Environment: RAYON_NUM_THREADS (default 2), PYTHON (default python3).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
a=$1 b=$2 model=$3 batch=$4 iters=${5:-50} rounds=${6:-2}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for round in $(seq "$rounds"); do
  for v in a b b a; do
    bin=$a
    [ "$v" = b ] && bin=$b
    echo "round $round: $v" >&2
    # Every node (--top large), as "name ms" lines.
    "$bin" profile "$model" --batch "$batch" --iters "$iters" --top 100000 2>&1 \
      | sed -n '/slowest nodes:/,$p' \
      | awk 'NF >= 5 && $1 != "node" { print $1, $(NF - 1) }' >>"$out/$v"
  done
done
"${PYTHON:-python3}" - "$out/a" "$out/b" <<'EOF'
import collections, statistics, sys

times = collections.defaultdict(lambda: ([], []))
for side, path in enumerate(sys.argv[1:3]):
    for line in open(path):
        name, ms = line.split()
        times[name][side].append(float(ms))

def middle_mean(xs):
    xs = sorted(xs)
    cut = len(xs) // 4
    xs = xs[cut:len(xs) - cut] or xs
    return sum(xs) / len(xs)

rows = []
for name, (a, b) in times.items():
    if a and b and len(a) == len(b):
        ta, tb = middle_mean(a), middle_mean(b)
        if ta > 0:
            rows.append((tb / ta, name, ta, tb))
if not rows:
    sys.exit("no node appeared in every run of both builds")
rows.sort()
total_a = sum(r[2] for r in rows)
total_b = sum(r[3] for r in rows)
print(f"nodes {len(rows)}: A {total_a:.3f} ms, B {total_b:.3f} ms, B/A {total_b / total_a:.3f}; "
      f"median node B/A {statistics.median(r[0] for r in rows):.3f}")
print(f"{'node':<40} {'A ms':>9} {'B ms':>9} {'B/A':>6}")
for ratio, name, ta, tb in rows:
    print(f"{name:<40} {ta:9.3f} {tb:9.3f} {ratio:6.3f}")
EOF
