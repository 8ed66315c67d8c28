#!/usr/bin/env bash
# Build the Palu decode benchmark for the H200 into .gpu/ (git-ignored), the folder the device
# tool carries. Then run on the GPU machine, from the repository root:
#   ./.gpu/palu_decode_bench            # checks against float64, then the shape table
#   ./.gpu/palu_decode_bench --quick    # checks and one shape
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=$(bash scripts/nvcc.sh)
mkdir -p .gpu
# The baseline: mistral.rs 0.8.1's own paged-attention kernels, from their crates.io source.
pa=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/mistralrs-paged-attn-0.8.1 2>/dev/null | head -n1 || true)
if [ -z "$pa" ]; then
    cargo fetch --manifest-path kernels/bench/fetch/Cargo.toml >&2
    pa=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/mistralrs-paged-attn-0.8.1 | head -n1)
fi
# The flags of mistralrs-paged-attn's build.rs.
pa_flags=(-std=c++17 -O3 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__
          -U__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math -DENABLE_FP8)
"$nvcc" "${pa_flags[@]}" -gencode arch=compute_90a,code=sm_90a -c "$pa/src/cuda/pagedattention_v1_bf16.cu" -o .gpu/pa_v1.o
"$nvcc" "${pa_flags[@]}" -gencode arch=compute_90a,code=sm_90a -c "$pa/src/cuda/pagedattention_v2_bf16.cu" -o .gpu/pa_v2.o
"$nvcc" -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_90,code=compute_90 \
    -DPALU_ABLATIONS -DPALU_WGMMA -lineinfo -o .gpu/palu_decode_bench kernels/bench/palu_decode_bench.cu kernels/src/palu_decode.cu .gpu/pa_v1.o .gpu/pa_v2.o
rm -f .gpu/pa_v1.o .gpu/pa_v2.o
echo "built .gpu/palu_decode_bench; run it on the H200 (device tool, carry .gpu)"
