#!/usr/bin/env python3
"""Static SASS counts per kernel, from `cuobjdump -sass` output (no GPU needed).

    nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -c kernels/src/palu_decode.cu -o /tmp/d.o
    cuobjdump -sass /tmp/d.o > /tmp/d.sass        # needs nvdisasm on PATH (pip: nvidia-cuda-nvdisasm)
    python3 scripts/sass_count.py /tmp/d.sass --match 'Li64ELi64ELi128ELi1ELi4ELi0ELi4ELb0' [--ops HADD2,HMUL2,PRMT]

Prints, for every kernel whose mangled name contains --match, its instruction count and the
counts of the --ops opcodes (default: the arithmetic a dequantization or a softmax spends).
Static counts: an unrolled loop body counts once per copy, a branch's both sides count.
"""
import argparse
import collections
import re

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("sass", help="cuobjdump -sass output")
p.add_argument("--match", default="", help="substring of the mangled kernel names to report")
p.add_argument("--ops", default="HADD2,HMUL2,HFMA2,PRMT,LOP3,SHF,FADD,FMUL,FFMA,F2FP,ISETP,FSEL,SEL,HMMA,LDSM,STS")
a = p.parse_args()

kernels, cur = {}, None
for line in open(a.sass):
    m = re.search(r"Function : (\S+)", line)
    if m:
        cur = m.group(1)
        kernels[cur] = collections.Counter()
        continue
    m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
    if cur and m:
        kernels[cur][m.group(2)] += 1

ops = a.ops.split(",")
print("| kernel | instructions | " + " | ".join(ops) + " |")
print("|---|---|" + "---|" * len(ops))
for name, c in sorted(kernels.items()):
    if a.match in name:
        print(f"| {name} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in ops) + " |")
