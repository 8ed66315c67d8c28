#!/usr/bin/env bash
# Print the path of an nvcc 13.0 (the GPU machine's driver, 580, rejects PTX from newer ones),
# installing the compiler-only CUDA 13.0 wheels from PyPI into ~/.cache/palu-cuda when none is
# there. No GPU and no system CUDA needed: CI uses it to compile every kernel.
set -euo pipefail
prefix=${PALU_CUDA_PREFIX:-$HOME/.cache/palu-cuda}
for c in "$prefix/nvidia/cu13/bin/nvcc" "$HOME/.cache/cuda-13.0-wheels/nvidia/cu13/bin/nvcc"; do
    if [ -x "$c" ] && "$c" --version | grep -q "release 13.0"; then echo "$c"; exit 0; fi
done
python3 -m pip install --quiet --no-deps --target "$prefix" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
echo "$prefix/nvidia/cu13/bin/nvcc"
