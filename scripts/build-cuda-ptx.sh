#!/usr/bin/env bash
# Regenerates crates/engine/cuda/NAME.ptx from every NAME.cu there with nvcc 13.0
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
for cu in "$ROOT"/crates/engine/cuda/*.cu; do
  ptx=${cu%.cu}.ptx
  "$CU/bin/nvcc" --ptx -arch=compute_80 -O3 -o "$ptx" "$cu"
  echo "wrote ${ptx#"$ROOT"/} ($(grep -m1 '^.version' "$ptx"))"
done
