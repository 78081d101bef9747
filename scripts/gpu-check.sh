#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and driver but no Rust
# toolchain, on the bundle scripts/build-cuda.sh made (carried binaries):
#   1. prints the device;
#   2. runs the device tests: toy, toy-sequential and ResNet18 fused vs
#      unfused vs eager and vs the CPU, the committed PyTorch fixtures, and
#      the conv -> batch_norm property test, each as NAME_cuda (the NAME_cpu
#      variants run too, on this machine's CPU);
#   3. benches ResNet18 on the GPU at batch 10 and 64 and the model zoo
#      ($WICK_GPU_MODELS, default ResNet50, MobileNetV2/V3, EfficientNet-B0)
#      at batch 10 (each bench also checks wick's output against candle's
#      eager model within 1e-4), and, where python3 has torch + torchvision,
#      PyTorch eager on the same GPU with the same protocol
#      (scripts/bench_reference_gpu.py) for a side-by-side ratio;
#   4. writes everything to $OUT (default ./gpu-check-out): gpu-check.json
#      (device, host CPU, date, commit, test counts, bench results, the
#      PyTorch reference) plus the raw logs.
#
#   scripts/gpu-check.sh [BUNDLE_DIR]      # default target-cuda/gpu
#
# Libraries: libcuda from the driver; cuBLAS / cuRAND 13 from the machine's
# toolkit or PyTorch's `nvidia-*` wheels (found through python3); libcudart
# from the bundle. Exit status: 0 only if every test passed and both benches ran.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=$(cd "${1:-$ROOT/target-cuda/gpu}" && pwd)
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

for name in xtask-cuda devices-cuda; do
  if [ -f "$BUNDLE/$name.xz" ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$BUNDLE/$name.xz" "$WORK/$name"
  else
    cp "$BUNDLE/$name" "$WORK/$name"
  fi
  chmod +x "$WORK/$name"
done
cp "$BUNDLE/libcudart.so.13" "$WORK/"
NV_LIBS=$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
print(":".join(sorted(d for r in roots for d in glob.glob(os.path.join(r, "*", "lib")) + glob.glob(os.path.join(r, "*", "*", "lib")))))
PY
)
export LD_LIBRARY_PATH="$WORK:${NV_LIBS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
lscpu | sed -n 's/^Model name: *//p' | head -1 | tee "$OUT/host-cpu.txt"
if ldd "$WORK/xtask-cuda" | grep "not found" | tee "$OUT/missing-libs.txt"; then
  echo "missing shared libraries (see above); set LD_LIBRARY_PATH to a CUDA 13 cuBLAS/cuRAND" >&2
fi

echo "== device tests"
WICK_FIXTURES_DIR="$ROOT/fixtures" "$WORK/devices-cuda" --test-threads 1 2>&1 | tee "$OUT/tests.log"
TESTS_RC=${PIPESTATUS[0]}

BENCH_RC=0
MODELS=${WICK_GPU_MODELS:-resnet50 mobilenet-v2 mobilenet-v3-large efficientnet-b0}
bench() { # MODEL BATCH [BENCH OPTIONS]
  echo "== bench $1 --device cuda --batch $2"
  "$WORK/xtask-cuda" bench "$1" --device cuda --batch "$2" "${@:3}" --json "$OUT/bench-$1-b$2.json" 2>&1 \
    | tee "$OUT/bench-$1-b$2.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || BENCH_RC=$rc
}
bench resnet18 10
bench resnet18 64
# One round each: candle's eager depthwise convs (a conv per group) are slow.
for model in $MODELS; do bench "$model" 10 --warmup 5 --max-rounds 1; done

echo "== PyTorch eager reference on the same GPU"
if python3 -c 'import torch, torchvision; assert torch.cuda.is_available()' 2>/dev/null; then
  PYTHONUNBUFFERED=1 python3 "$ROOT/scripts/bench_reference_gpu.py" --batch 10 64 --json "$OUT/torch-reference.json" 2>&1 \
    | tee "$OUT/torch-reference.log"
  if [ -n "$MODELS" ]; then
    # shellcheck disable=SC2086 # one word per model
    PYTHONUNBUFFERED=1 python3 "$ROOT/scripts/bench_reference_gpu.py" --model $MODELS --batch 10 \
      --json "$OUT/torch-reference-zoo.json" 2>&1 | tee "$OUT/torch-reference-zoo.log"
  fi
else
  echo "(python3 has no CUDA torch + torchvision: no reference row)"
fi

COMMIT=$(cat "$BUNDLE/COMMIT" 2>/dev/null || echo unknown)
python3 - "$OUT" "$COMMIT" "$TESTS_RC" "$BENCH_RC" <<'PY'
import datetime, json, os, re, sys
out, commit, tests_rc, bench_rc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
log = open(os.path.join(out, "tests.log")).read()
results = dict(re.findall(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", log, re.M))
bench = {}
for name in sorted(os.listdir(out)):
    m = re.fullmatch(r"bench-(.+)-b(\d+)\.json", name)
    if m:
        bench[f"{m.group(1)}_batch_{m.group(2)}"] = json.load(open(os.path.join(out, name)))
reference = None
for name in ("torch-reference.json", "torch-reference-zoo.json"):
    path = os.path.join(out, name)
    if os.path.exists(path):
        part = json.load(open(path))
        if reference is None:
            reference = part
        else:
            reference["rows"] += part["rows"]
summary = {
    "device": open(os.path.join(out, "device.txt")).read().strip(),
    "host_cpu": open(os.path.join(out, "host-cpu.txt")).read().strip(),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit,
    "tests": {
        "exit_status": tests_rc,
        "passed": sorted(k for k, v in results.items() if v == "ok"),
        "failed": sorted(k for k, v in results.items() if v == "FAILED"),
        "cuda_variants_passed": sum(1 for k, v in results.items() if k.endswith("_cuda") and v == "ok"),
    },
    "bench_exit_status": bench_rc,
    "bench": bench,
    "torch_reference": reference,
}
json.dump(summary, open(os.path.join(out, "gpu-check.json"), "w"), indent=2)
print(json.dumps({k: summary[k] for k in ("device", "commit", "bench_exit_status")} | {"tests_failed": summary["tests"]["failed"], "cuda_variants_passed": summary["tests"]["cuda_variants_passed"]}, indent=2))
PY
echo "results in $OUT/gpu-check.json"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
