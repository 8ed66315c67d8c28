#!/usr/bin/env bash
# The measurements behind docs/accuracy.md. Long: about an hour and a half on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
F=${PALU_FIXTURES:-$PWD/../shared/fixtures}
mkdir -p out
cargo build --release -p palu-plugin --example accuracy --bin palu
test -d out/smollm2 || ./target/release/palu convert-gguf "$F/models/SmolLM2-135M-Instruct.Q4_1.gguf" out/smollm2
A=./target/release/examples/accuracy
C4="$F/text/c4-train-00000-first800.jsonl"
# stories260K on the TinyStories sample at 256 (calibration as the authors' reference dump: 64×256, Fisher 32×256)
$A "$F/models/stories260K" --calib "$C4" --text "$F/text/tinystories-sample.txt" --seq-len 256 --windows 7 \
   --calib-samples 64 --calib-seq-len 256 --fisher-samples 32 --groups 1,4 --ratios 0.7,0.5,0.3 \
   --methods uniform:1,fisher-uniform:1,waterfill:1 --bits-for 1:0.5:fisher-uniform:1 --bits 8,4,3,2 \
   --zero-points free,clamped --out out/accuracy-stories.json | tee out/accuracy-stories.md
# SmolLM2-135M on WikiText-2 at 1024, first 8 windows, the full grid
$A out/smollm2 --calib "$C4" --text "$F/text/wikitext-2-raw-test.txt" --seq-len 1024 --windows 8 \
   --groups 3,1 --ratios 0.5,0.7,0.3 --methods fisher-uniform:32,fisher-uniform:8,uniform:32,waterfill:8,fisher:8 \
   --bits-for 3:0.5:fisher-uniform:8 --bits 8,4,3,2 --zero-points free,clamped \
   --out out/accuracy-smollm2-w8.json | tee out/accuracy-smollm2-w8.md
