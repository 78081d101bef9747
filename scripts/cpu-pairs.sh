#!/usr/bin/env bash
# Same-minute CPU speed pairs: for each MODEL:BATCH[:ISA], ONNX Runtime
# (and OpenVINO where installed) through scripts/bench_reference.py, then
# wick's `bench MODEL --modes wick` right after, both on 2 threads. For a
# machine without Rust (the GPU machine's host CPU, with the CUDA bundle's
# xtask, which runs the CPU path too) as well as this one. Not run by CI.
#
#   scripts/cpu-pairs.sh mobilenet-v2:1 resnet18:10:avx2 ...
#
# Environment: XTASK (default `cargo xtask`; e.g. an unpacked xtask-cuda),
# PYTHON (default python3, with torch, torchvision, onnx, onnxruntime),
# OUT (default ./cpu-pairs-out: one log per pair plus wick's JSON). ISA, if
# given, is WICK_ISA for wick's run (avx512, avx2 or scalar); the runtimes
# run their own best path, and with avx2 ONNX Runtime and OpenVINO also run
# held to AVX2 (`bench_reference.py --isa avx2`: the same-machine AVX2
# references; ONNX Runtime's needs CPUID faulting and `cc`, else its row
# says why it is missing). Each pair ends in a `ratio:` line, printed and
# appended to the pair's log (wick's median
# over ORT's and over the faster runtime's, against the AVX2-held ones for
# an avx2 pair), after a `steal:` line (the share of CPU time the
# hypervisor gave to other guests during the runtimes' runs and during
# wick's: a noisy neighbour, measured); repeat a spec to see how far the
# ratio moves between pairs (a repeat's log and JSON get `-2`, `-3`, ...
# in their names).
# With INTERLEAVE=ROUNDS, each pair is followed by the same runtimes and
# wick taking turns in one run (`bench_reference.py --interleave`, chunks
# of about CHUNK_MS ms, default 300): its `ratio per round:` lines, the
# rounds' median ratio, are the figure to read on a host whose speed
# drifts between minutes.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
XTASK=${XTASK:-cargo xtask}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/cpu-pairs-out}
mkdir -p "$OUT"
export RAYON_NUM_THREADS=2
rc=0

# One line of ratios from a pair's log (its first rows: the pair's, not
# the interleaved run's): wick's median over ONNX Runtime's
# and over the faster of ONNX Runtime and OpenVINO, each runtime's own best
# path; with ISA avx2, over the runtimes held to AVX2 (`-avx2` rows) when
# they ran. Nothing when a median is missing (a failed run says why above).
ratios() {
  awk -v isa="$2" '
    function median_of(name) { return (name in med) ? med[name] : 0 }
    /^(onnxruntime|openvino)-[0-9.]+(-avx2)? / {
      key = $1; sub(/-[0-9.]+/, "", key); if (!(key in med)) med[key] = $2
    }
    /^wick / { if (!("wick" in med)) med["wick"] = $2 }
    END {
      suffix = (isa == "avx2" && ("onnxruntime-avx2" in med || "openvino-avx2" in med)) ? "-avx2" : ""
      ort = median_of("onnxruntime" suffix); ov = median_of("openvino" suffix); wick = median_of("wick")
      if (wick == 0 || ort == 0) exit
      faster = (ov > 0 && ov < ort) ? ov : ort
      printf "ratio: wick / ORT%s %.3f, wick / the faster of ORT%s and OV%s %.3f\n", suffix, wick / ort, suffix, suffix, wick / faster
    }' "$1"
}

# The CPU time the hypervisor gave to other guests ("steal": a vCPU this
# machine wanted but did not get) as a percentage of all CPU time since
# `ticks` printed $1 (/proc/stat's first line); "?" where it is unreadable.
# A worker stolen mid-forward stalls the other at the next barrier, so a
# pair with much steal says little about either side.
ticks() { head -1 /proc/stat 2>/dev/null; }
steal_since() {
  awk -v before="$1" 'NR == 1 {
      n = split(before, b); total = 0
      for (i = 2; i <= 9; i++) total += $i - b[i]
      if (n >= 9 && total > 0) printf "%.1f%%", 100 * ($9 - b[9]) / total; else printf "?"
    }' /proc/stat 2>/dev/null || printf "?"
}

# How many times each spec has run: a repeat's files get `-2`, `-3`, ...
declare -A runs
for spec in "$@"; do
  IFS=: read -r model batch isa <<<"$spec"
  name="$model-b$batch${isa:+-$isa}"
  runs[$name]=$((${runs[$name]:-0} + 1))
  [ "${runs[$name]}" -gt 1 ] && name="$name-${runs[$name]}"
  log="$OUT/pair-$name.log"
  {
    echo "== $model batch $batch${isa:+ (wick on $isa)} $(date -u +%FT%TZ)"
    before=$(ticks)
    # shellcheck disable=SC2046 # no argument without an AVX2 ISA
    PYTHONUNBUFFERED=1 "$PYTHON" "$ROOT/scripts/bench_reference.py" --model "${model//-/_}" --batch "$batch" \
      $([ "$isa" = avx2 ] && echo --isa avx2)
    runtimes_steal=$(steal_since "$before") before=$(ticks)
    # shellcheck disable=SC2086 # XTASK may be `cargo xtask`; no WICK_ISA without an ISA
    env ${isa:+WICK_ISA=$isa} $XTASK bench "$model" --modes wick --batch "$batch" \
      --json "$OUT/wick-$name.json"
    status=$?
    echo "steal: $runtimes_steal of the CPU time during the runtimes' runs, $(steal_since "$before") during wick's"
    if [ -n "${INTERLEAVE:-}" ]; then
      # shellcheck disable=SC2046 # no argument without an AVX2 ISA
      PYTHONUNBUFFERED=1 "$PYTHON" "$ROOT/scripts/bench_reference.py" --model "${model//-/_}" --batch "$batch" \
        --interleave "$INTERLEAVE" --chunk-ms "${CHUNK_MS:-300}" --xtask "$XTASK" \
        ${isa:+--wick-isa $isa} $([ "$isa" = avx2 ] && echo --isa avx2) || status=1
    fi
    (exit "$status")
  } >"$log" 2>&1 || rc=1
  grep -E '^== |^onnxruntime|^openvino|^\(|^wick|^peak RSS|^steal:|^ratio per round:|interleaved:' "$log"
  # Into the pair's log too, so that a log read later carries its ratio.
  ratios "$log" "$isa" | tee -a "$log"
done
exit $rc
