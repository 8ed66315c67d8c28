#!/usr/bin/env bash
# Build everything the H200 runs into .gpu/ (git-ignored; the device tool carries it):
#   .gpu/palu-gpu-tests.xz   palu-plugin's math tests with `--features cuda` (the CUDA kernels
#                            against their CPU twins on fresh random inputs), stripped
#   .gpu/palu_decode_bench   the kernel benchmark (scripts/gpu-bench.sh)
#   .gpu/run.sh              what to run there: `bash .gpu/run.sh [bench flags]`
# Needs the CUDA 13.0 toolkit with its libraries (../shared/tools/install-cuda-toolkit.sh), not a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${PALU_CUDA_TOOLS:-../shared/tools}
if [ -z "${CUDA_ROOT:-}" ]; then
    [ -f "$tools/cuda-env.sh" ] || { echo "error: no CUDA toolkit: run $tools/install-cuda-toolkit.sh or set CUDA_ROOT" >&2; exit 1; }
    bash "$tools/install-cuda-toolkit.sh" >&2
    # shellcheck disable=SC1091
    source "$tools/cuda-env.sh"
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
mkdir -p .gpu
bin=$(cargo test --release -p palu-plugin --features cuda --test math --no-run --message-format json 2>/dev/null |
      python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "math": print(m["executable"])' | tail -n1)
[ -n "$bin" ] || { cargo test --release -p palu-plugin --features cuda --test math --no-run; exit 1; }
strip -o .gpu/palu-gpu-tests "$bin"
xz -f -T0 .gpu/palu-gpu-tests
bash scripts/gpu-bench.sh
cat > .gpu/run.sh <<'RUN'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: GPU tests, then the benchmark (its table last).
set -uo pipefail
cuda_lib=$(dirname "$(ldconfig -p | grep -m1 'libcublas.so.13' | awk '{print $NF}')")
export LD_LIBRARY_PATH="$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
xz -dkf .gpu/palu-gpu-tests.xz && chmod +x .gpu/palu-gpu-tests
./.gpu/palu-gpu-tests decode --nocapture --test-threads 1; tests=$?
./.gpu/palu_decode_bench "$@"; bench=$?
echo "gpu tests: exit $tests; bench: exit $bench"
exit $(( tests || bench ))
RUN
ls -la .gpu
