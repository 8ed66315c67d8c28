#!/usr/bin/env bash
# On the GPU machine, from the repository root (after `just gpu-bench` here, with .gpu carried):
# profile one launch of the decode split kernel (Llama-3 g = 1, 16K × batch 8) per variant with
# Nsight Compute and export, per SASS instruction, its execution count and stall samples.
#   bash scripts/ncu-profile.sh OUT_DIR [VARIANT...]     (variants: 0 default, 3 wgmma; default: 0 3)
# Then, here: python3 scripts/ncu_sass.py OUT_DIR/src_v0.csv [--top 30] [--loop]
set -euo pipefail
out=${1:?usage: ncu-profile.sh OUT_DIR [VARIANT...]}
shift
variants=("${@:-0 3}")
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n1)
[ -x "$ncu" ] || { echo "error: ncu (Nsight Compute) not found on this machine" >&2; exit 1; }
mkdir -p "$out"
for v in ${variants[*]}; do
    "$ncu" --set full --import-source no -k regex:split_kernel -c 1 -o "$out/v$v" ./.gpu/palu_decode_bench --profile "$v" >/dev/null
    "$ncu" -i "$out/v$v.ncu-rep" --page source --print-source sass --csv >"$out/src_v$v.csv"
    "$ncu" -i "$out/v$v.ncu-rep" --page details >"$out/details_v$v.txt"
    rm -f "$out/v$v.ncu-rep"  # ~26 MB each: too large to carry back
    echo "variant $v:"
    grep -E "^    Duration|Executed Instructions  |Issue Slots Busy|Registers Per|Theoretical Occupancy" "$out/details_v$v.txt"
done
