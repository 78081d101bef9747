#!/usr/bin/env bash
# Regenerates crates/engine/cuda/epilogue.ptx from epilogue.cu with nvcc 13.0
# (PTX ISA 9.0, which driver 580 can JIT; see ../shared/cuda/RECIPE.md).
# The PTX is committed, so neither CI nor the CUDA build needs this script.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${WICK_CUDA_TOOLS:-$ROOT/target-cuda/toolchain}/cu13
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96
CU=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
"$CU/bin/nvcc" --ptx -arch=compute_80 -O3 -o "$ROOT/crates/engine/cuda/epilogue.ptx" "$ROOT/crates/engine/cuda/epilogue.cu"
echo "wrote crates/engine/cuda/epilogue.ptx ($(grep -m1 '^.version' "$ROOT/crates/engine/cuda/epilogue.ptx"))"
