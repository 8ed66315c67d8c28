# palu-rs tasks. Fixtures default to ../shared/fixtures (override with PALU_FIXTURES).
fixtures := env_var_or_default("PALU_FIXTURES", justfile_directory() + "/../shared/fixtures")
work := justfile_directory() + "/out"

# List recipes.
default:
    @just --list

# Unpack mistralrs-core 0.8.1 from the cargo cache and apply patches/*.patch (idempotent).
patch-engine:
    bash patches/apply.sh

# Build the `palu` and `mistralrs-server` binaries (release).
build: patch-engine
    cargo build --release -p palu-plugin --features engine

# The main job: convert SmolLM2 from its GGUF, compress it to Palu-50% (J-LRD), inspect, evaluate,
# then serve it with `mistralrs-server --kv-cache palu` and ask it a question over HTTP.
demo: build
    mkdir -p {{work}}
    test -d {{work}}/smollm2 || ./target/release/palu convert-gguf {{fixtures}}/models/SmolLM2-135M-Instruct.Q4_1.gguf {{work}}/smollm2
    test -d {{work}}/smollm2-palu50 || ./target/release/palu compress {{work}}/smollm2 {{work}}/smollm2-palu50 --config configs/smollm2-135m-g3-r50.toml --calib {{fixtures}}/text/c4-train-00000-first800.jsonl
    ./target/release/palu inspect {{work}}/smollm2-palu50
    ./target/release/palu generate {{work}}/smollm2-palu50 --prompt "The capital of France is" --max-tokens 8
    ./target/release/palu eval ppl {{work}}/smollm2 --text {{fixtures}}/text/wikitext-2-raw-test.txt --seq-len 1024 --windows 8
    ./target/release/palu eval ppl {{work}}/smollm2-palu50 --text {{fixtures}}/text/wikitext-2-raw-test.txt --seq-len 1024 --windows 8
    bash scripts/serve-demo.sh {{work}}/smollm2-palu50

# Run every test: the patched engine's own unit tests, then ours (unit, fixtures, snapshots,
# the engine integration tests), with nextest.
test: patch-engine
    cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
    just kernels-check
    just engine-tests
    PALU_FIXTURES={{fixtures}} cargo nextest run --workspace --no-fail-fast

# The patched mistralrs-core's own unit tests, but the three that download tokenizers from huggingface.co.
engine-tests: patch-engine
    cargo nextest run -p mistralrs-core --lib --no-fail-fast -E 'not (test(test_encode_decode_gpt2) | test(test_encode_decode_llama) | test(test_tiktoken_conversion))'

# (`just bench --features cuda` on a GPU machine adds the fused kernel's rows.)
# Criterion: one decode step, dense K/V vs Palu's candle ops vs the decode op (CPU twin).
bench *ARGS:
    cargo bench -p palu-plugin --bench decode {{ARGS}}

# Compile every CUDA kernel with nvcc 13.0 for sm_90a (no GPU needed; installs nvcc from PyPI).
kernels-check:
    bash scripts/kernels-check.sh

# On the H200 the benchmark prints float64 checks, the shape table with the stock kernel and the
# roofline beside every row, then the CUDA issue's targets as met / missed; --ablate shows where
# the time goes, --llama3 limits it to the Llama-3-8B shape.
# Build the H200 decode benchmark into .gpu/ (run it there: ./.gpu/palu_decode_bench [--llama3]).
gpu-bench:
    bash scripts/gpu-bench.sh

# Build the end-to-end serving benchmark (stock with paged attention vs --kv-cache palu, Llama-3-8B shape) into .gpu2/ for the H200.
serve-bench:
    bash scripts/serve-bench.sh

# Build the GPU tests (CUDA kernels vs their CPU twins) and the benchmark into .gpu/; on the H200
# run `bash .gpu/run.sh` (tests, then the benchmark table). Needs the CUDA 13.0 toolkit, no GPU.
gpu-test:
    bash scripts/gpu-test.sh

# Accuracy sweep behind docs/accuracy.md (long: hours on 2 cores).
accuracy:
    bash scripts/accuracy.sh
