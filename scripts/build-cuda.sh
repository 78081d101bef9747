#!/usr/bin/env bash
# Builds wick's CUDA binaries on a machine with no GPU and no CUDA toolkit
# (recipe: ../shared/cuda/RECIPE.md): nvcc 13.0 from PyPI, link-time stub
# libraries for the driver/cuBLAS/cuRAND/NVRTC, the real libcudart, and
# CUDA_COMPUTE_CAP=90 (H100/H200). CI never runs this.
#
# Output, the bundle scripts/gpu-check.sh runs on a GPU machine (~12 MB,
# within the 64 MiB a device run may carry):
#   target-cuda/gpu/xtask-cuda.xz     `cargo xtask` with the cuda feature
#   target-cuda/gpu/devices-cuda.xz   the device tests (NAME_cpu + NAME_cuda)
#   target-cuda/gpu/libcudart.so.13   the CUDA runtime both link against
#
#   scripts/build-cuda.sh            # ~18 minutes cold on 2 cores (candle-kernels)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=${WICK_CUDA_TOOLS:-$ROOT/target-cuda/toolchain}
VENV=$TOOLS/cu13
STUBS=$TOOLS/stubs13

if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
CU=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")

# cudarc's sources must be in the registry before the stubs can be made from them.
cargo fetch --manifest-path "$ROOT/Cargo.toml"
STUB_SCRIPT=${WICK_MAKE_STUBS:-$ROOT/../shared/cuda/make_stubs.sh}
if [ ! -f "$STUB_SCRIPT" ]; then
  echo "make_stubs.sh not found at $STUB_SCRIPT (set WICK_MAKE_STUBS)" >&2
  exit 1
fi
bash "$STUB_SCRIPT" 13 "$STUBS" "$CU/lib/libcudart.so.13"

export PATH=$CU/bin:$PATH CUDA_HOME=$STUBS CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=$ROOT/target-cuda
cargo build --release --manifest-path "$ROOT/Cargo.toml" -p xtask --features cuda
# The device tests as one executable (release: reuses the kernels built above).
TEST_BIN=$(cargo test --release --manifest-path "$ROOT/Cargo.toml" -p wick-tests --features cuda --test devices \
  --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "devices":
        print(m["executable"])')
BUNDLE=$CARGO_TARGET_DIR/gpu
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
cp -L "$CU/lib/libcudart.so.13" "$CARGO_TARGET_DIR/release/"
cp -L "$CU/lib/libcudart.so.13" "$BUNDLE/"
# Debug info stripped, then xz: each binary is ~45 MB with candle's PTX, ~6 MB compressed.
strip --strip-debug -o "$BUNDLE/xtask-cuda" "$CARGO_TARGET_DIR/release/xtask"
strip --strip-debug -o "$BUNDLE/devices-cuda" "$TEST_BIN"
xz -T0 -6 -f "$BUNDLE/xtask-cuda" "$BUNDLE/devices-cuda"
# The commit the bundle was built from (+dirty when the tree had changes):
# gpu-check.sh reports this, not the GPU machine's copy of .git.
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD -- crates xtask tests examples 2>/dev/null || COMMIT="$COMMIT+dirty"
echo "$COMMIT" > "$BUNDLE/COMMIT"
echo "built $BUNDLE (CUDA, sm_${CUDA_COMPUTE_CAP}):"
ls -l "$BUNDLE"
echo "on a GPU machine: scripts/gpu-check.sh $BUNDLE   (needs python3 and the driver; see the script)"
