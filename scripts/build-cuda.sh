#!/usr/bin/env bash
# Builds wick's CUDA binaries on a machine with no GPU and no CUDA toolkit
# (recipe: ../shared/cuda/RECIPE.md): nvcc 13.0 from PyPI, link-time stub
# libraries for the driver/cuBLAS/cuRAND/NVRTC, the real libcudart, and
# CUDA_COMPUTE_CAP=90 (H100/H200). Output: target-cuda/release/xtask plus
# libcudart.so.13 next to it. CI never runs this.
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
cp -L "$CU/lib/libcudart.so.13" "$CARGO_TARGET_DIR/release/"
# Carry-sized copy (debug info stripped; the GPU machine's lending limit is 64 MiB).
strip --strip-debug -o "$CARGO_TARGET_DIR/release/xtask-cuda" "$CARGO_TARGET_DIR/release/xtask"
echo "built $CARGO_TARGET_DIR/release/xtask-cuda (CUDA, sm_${CUDA_COMPUTE_CAP}, $(du -h "$CARGO_TARGET_DIR/release/xtask-cuda" | cut -f1)); libcudart.so.13 beside it"
echo "run it with LD_LIBRARY_PATH=<that directory>:<the GPU machine's CUDA 13 libraries>"
