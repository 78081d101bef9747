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
# says why it is missing).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
XTASK=${XTASK:-cargo xtask}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/cpu-pairs-out}
mkdir -p "$OUT"
export RAYON_NUM_THREADS=2
rc=0
for spec in "$@"; do
  IFS=: read -r model batch isa <<<"$spec"
  log="$OUT/pair-$model-b$batch${isa:+-$isa}.log"
  {
    echo "== $model batch $batch${isa:+ (wick on $isa)} $(date -u +%FT%TZ)"
    # shellcheck disable=SC2046 # no argument without an AVX2 ISA
    PYTHONUNBUFFERED=1 "$PYTHON" "$ROOT/scripts/bench_reference.py" --model "${model//-/_}" --batch "$batch" \
      $([ "$isa" = avx2 ] && echo --isa avx2)
    # shellcheck disable=SC2086 # XTASK may be `cargo xtask`; no WICK_ISA without an ISA
    env ${isa:+WICK_ISA=$isa} $XTASK bench "$model" --modes wick --batch "$batch" \
      --json "$OUT/wick-$model-b$batch${isa:+-$isa}.json"
  } >"$log" 2>&1 || rc=1
  grep -E '^== |^onnxruntime|^openvino|^\(|^wick |^peak RSS' "$log"
done
exit $rc
