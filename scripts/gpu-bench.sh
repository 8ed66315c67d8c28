#!/usr/bin/env bash
# Build the Palu decode benchmark for the H200 into .gpu/ (git-ignored), the folder the device
# tool carries. Then run on the GPU machine, from the repository root:
#   ./.gpu/palu_decode_bench            # checks against float64, then the shape table
#   ./.gpu/palu_decode_bench --quick    # checks and one shape
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=$(bash scripts/nvcc.sh)
mkdir -p .gpu
"$nvcc" -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_90,code=compute_90 \
    -o .gpu/palu_decode_bench kernels/bench/palu_decode_bench.cu kernels/src/palu_decode.cu
echo "built .gpu/palu_decode_bench; run it on the H200 (device tool, carry .gpu)"
