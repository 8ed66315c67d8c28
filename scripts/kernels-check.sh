#!/usr/bin/env bash
# Compile every CUDA source under kernels/ for Hopper (sm_90a) with nvcc 13.0, as the GPU build
# does: a kernel that does not compile fails CI, which has no GPU to run it.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=$(bash scripts/nvcc.sh)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
for f in kernels/src/*.cu kernels/bench/*.cu; do
    # PALU_WGMMA: the sm_90a-only wgmma kernels are instantiated (and checked) too.
    "$nvcc" -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -DPALU_WGMMA -c "$f" -o "$out/$(basename "$f").o"
    n=$((n + 1))
done
echo "kernels: $n CUDA sources compile with $("$nvcc" --version | grep -o 'release [0-9.]*')"
# Host-side checks of device code written for host and device (no GPU needed): built by nvcc
# against the static CUDA runtime, run here.
for t in kernels/tests/*.cu; do
    "$nvcc" -std=c++17 -O2 -L"$(dirname "$nvcc")/../lib" "$t" -o "$out/$(basename "$t" .cu)"
    "$out/$(basename "$t" .cu)"
done
