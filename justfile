# palu-rs tasks. Fixtures default to ../shared/fixtures (override with PALU_FIXTURES).
fixtures := env_var_or_default("PALU_FIXTURES", justfile_directory() + "/../shared/fixtures")
work := justfile_directory() + "/out"

# List recipes.
default:
    @just --list

# Build the `palu` binary (release).
build:
    cargo build --release -p palu-plugin

# The main job: convert SmolLM2 from its GGUF, compress it to Palu-50% (J-LRD), inspect, evaluate.
demo: build
    mkdir -p {{work}}
    test -d {{work}}/smollm2 || ./target/release/palu convert-gguf {{fixtures}}/models/SmolLM2-135M-Instruct.Q4_1.gguf {{work}}/smollm2
    test -d {{work}}/smollm2-palu50 || ./target/release/palu compress {{work}}/smollm2 {{work}}/smollm2-palu50 --config configs/smollm2-135m-g3-r50.toml --calib {{fixtures}}/text/c4-train-00000-first800.jsonl
    ./target/release/palu inspect {{work}}/smollm2-palu50
    ./target/release/palu generate {{work}}/smollm2-palu50 --prompt "The capital of France is" --max-tokens 8
    ./target/release/palu eval ppl {{work}}/smollm2 --text {{fixtures}}/text/wikitext-2-raw-test.txt --seq-len 1024 --windows 8
    ./target/release/palu eval ppl {{work}}/smollm2-palu50 --text {{fixtures}}/text/wikitext-2-raw-test.txt --seq-len 1024 --windows 8

# Run every test (unit, fixtures, snapshots) with nextest.
test:
    cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
    PALU_FIXTURES={{fixtures}} cargo nextest run --workspace --exclude palu-integration-tests --no-fail-fast

# Accuracy sweep behind docs/accuracy.md (long: hours on 2 cores).
accuracy:
    bash scripts/accuracy.sh
