#!/usr/bin/env bash
# Build the end-to-end serving benchmark (integration-tests/src/bin/serve_bench.rs) with
# --features cuda and pack it, with the stories260K tokenizer it serves the synthetic checkpoint
# with, into .gpu2/ (git-ignored) for the device tool to carry. On the H200:
#   cuda_lib=$(dirname "$(ldconfig -p | grep -m1 libcublas.so.13 | awk '{print $NF}')")
#   LD_LIBRARY_PATH=$cuda_lib PALU_FIXTURES=$PWD/.gpu2/fix xz -dkf .gpu2/serve_bench.xz
#   ./.gpu2/serve_bench --work /tmp/sb --layers 4 --context 16384 --streams 4 --gen 32 --latent-bits 4
# The issue's 16 × 32K configuration (a heartbeat every 30 s; the engine's interval logger shows
# running / waiting sequences):
#   RUST_LOG=mistralrs_core=info ./.gpu2/serve_bench --work /tmp/sb --layers 32 --context 32768 \
#       --streams 16 --gen 32 --configs palu-paged
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${PALU_CUDA_TOOLS:-../shared/tools}
fixtures=${PALU_FIXTURES:-../shared/fixtures}
if [ -z "${CUDA_ROOT:-}" ]; then
    bash "$tools/install-cuda-toolkit.sh" >&2
    # shellcheck disable=SC1091
    source "$tools/cuda-env.sh"
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
bash patches/apply.sh
cargo build --release -p palu-integration-tests --features cuda --bin serve_bench
rm -rf .gpu2 && mkdir -p .gpu2/fix/models/stories260K
strip -o .gpu2/serve_bench target/release/serve_bench
xz -T0 .gpu2/serve_bench
cp "$fixtures"/models/stories260K/tokenizer*.json "$fixtures"/models/stories260K/config.json .gpu2/fix/models/stories260K/
echo "packed .gpu2/ ($(du -sh .gpu2 | cut -f1)); carry it and run .gpu2/serve_bench there (see this script's header)"
