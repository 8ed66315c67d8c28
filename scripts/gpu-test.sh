#!/usr/bin/env bash
# Build everything the H200 runs into .gpu/ (git-ignored; the device tool carries it):
#   .gpu/palu-gpu-tests.xz    palu-plugin's math tests with `--features cuda`: the CUDA kernels
#                             against their CPU twins on fresh random inputs
#   .gpu/palu-gpu-paged.xz    palu-plugin's paged tests with `--features cuda`: the decode kernel
#                             reading the engine's blocks, and the row copies, against CPU twins
#   .gpu/engine-gpu-tests.xz  integration-tests/tests/engine_gpu.rs: the engine on the GPU
#                             against the engine on the CPU, SmolLM2 Palu-50 % on WikiText-2
#   .gpu/decode-bench.xz      the criterion decode-step bench with `--features cuda` (dense K/V vs
#                             Palu candle ops vs the fused kernel, on the GPU)
#   .gpu/palu_decode_bench    the kernel benchmark (scripts/gpu-bench.sh)
#   .gpu/run.sh               what to run there: `bash .gpu/run.sh [bench flags]`
# and the fixtures the engine test reads into .gpu-fix/a and .gpu-fix/b (the SmolLM2 GGUF split
# in two: one call carries at most 64 MiB). Carry .gpu-fix/a, then .gpu-fix/b, then .gpu, in
# three calls while the machine stays warm; run.sh reassembles and checks the GGUF.
# Needs the CUDA 13.0 toolkit with its libraries (../shared/tools/install-cuda-toolkit.sh), not a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${PALU_CUDA_TOOLS:-../shared/tools}
fixtures=${PALU_FIXTURES:-../shared/fixtures}
if [ -z "${CUDA_ROOT:-}" ]; then
    [ -f "$tools/cuda-env.sh" ] || { echo "error: no CUDA toolkit: run $tools/install-cuda-toolkit.sh or set CUDA_ROOT" >&2; exit 1; }
    bash "$tools/install-cuda-toolkit.sh" >&2
    # shellcheck disable=SC1091
    source "$tools/cuda-env.sh"
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
bash patches/apply.sh
mkdir -p .gpu

# Build one test target with --features cuda (release) and pack its stripped binary.
pack_test() {  # package test-target output-name
    local bin
    bin=$(cargo test --release -p "$1" --features cuda --test "$2" --no-run --message-format json 2>/dev/null |
          python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]: print(m["executable"])' "$2" | tail -n1)
    [ -n "$bin" ] || { cargo test --release -p "$1" --features cuda --test "$2" --no-run; exit 1; }
    strip -o ".gpu/$3" "$bin"
    xz -f -T0 ".gpu/$3"
}
pack_test palu-plugin math palu-gpu-tests
pack_test palu-plugin paged palu-gpu-paged
pack_test palu-integration-tests engine_gpu engine-gpu-tests
bench=$(cargo bench -p palu-plugin --bench decode --features cuda --no-run --message-format json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "decode": print(m["executable"])' | tail -n1)
[ -n "$bench" ] || { cargo bench -p palu-plugin --bench decode --features cuda --no-run; exit 1; }
strip -o .gpu/decode-bench "$bench"
xz -f -T0 .gpu/decode-bench
bash scripts/gpu-bench.sh

gguf=SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf .gpu-fix && mkdir -p .gpu-fix/a/text .gpu-fix/a/models .gpu-fix/b
split -b 50000000 "$fixtures/models/$gguf" .gpu-fix/part.
mv .gpu-fix/part.aa .gpu-fix/a/ && mv .gpu-fix/part.ab .gpu-fix/b/
cp "$fixtures/README.md" .gpu-fix/a/
cp "$fixtures/text/c4-train-00000-first800.jsonl" "$fixtures/text/wikitext-2-raw-test.txt" .gpu-fix/a/text/
# stories260K's tokenizer serves the synthetic Llama-3-shaped checkpoint of the packed-latent test.
mkdir -p .gpu-fix/a/models/stories260K
cp "$fixtures"/models/stories260K/tokenizer*.json "$fixtures"/models/stories260K/config.json .gpu-fix/a/models/stories260K/
(cd "$fixtures/models" && sha256sum "$gguf") > .gpu-fix/a/models/SHA256SUMS

cat > .gpu/run.sh <<'RUN'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: GPU tests, then the benchmark (its table last).
set -uo pipefail
cuda_lib=$(dirname "$(ldconfig -p | grep -m1 'libcublas.so.13' | awk '{print $NF}')")
export LD_LIBRARY_PATH="$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for t in palu-gpu-tests palu-gpu-paged engine-gpu-tests decode-bench; do xz -dkf ".gpu/$t.xz" && chmod +x ".gpu/$t"; done
./.gpu/palu-gpu-tests decode_kernel latent_codec_kernels packed_decode_kernel --nocapture --test-threads 1; kernel_tests=$?
./.gpu/palu-gpu-paged --nocapture --test-threads 1 || kernel_tests=$?
engine_tests=skipped
if [ -f .gpu-fix/a/part.aa ] && [ -f .gpu-fix/b/part.ab ]; then
    fix=$PWD/.gpu-fix/fixtures
    mkdir -p "$fix/models" "$fix/text" .gpu-fix/scratch
    cp .gpu-fix/a/README.md "$fix/" && cp .gpu-fix/a/text/* "$fix/text/" && cp -r .gpu-fix/a/models/stories260K "$fix/models/"
    cat .gpu-fix/a/part.aa .gpu-fix/b/part.ab > "$fix/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    (cd "$fix/models" && sha256sum -c ../../a/models/SHA256SUMS) &&
    PALU_FIXTURES=$fix PALU_SCRATCH=$PWD/.gpu-fix/scratch RUST_LOG=palu=info \
        ./.gpu/engine-gpu-tests --nocapture --test-threads 1
    engine_tests=$?
else
    echo "engine GPU tests skipped: carry .gpu-fix/a and .gpu-fix/b first (scripts/gpu-test.sh)"
fi
./.gpu/decode-bench --bench GPU --warm-up-time 1 --measurement-time 2 --noplot 2>&1 | grep -E "^decode|^unpack|time:"
./.gpu/palu_decode_bench "$@"; bench=$?
echo "kernel tests: exit $kernel_tests; engine tests: $engine_tests; bench: exit $bench"
[ "$kernel_tests" = 0 ] && [ "$bench" = 0 ] && { [ "$engine_tests" = 0 ] || [ "$engine_tests" = skipped ]; }
RUN
ls -la .gpu .gpu-fix/a .gpu-fix/b
