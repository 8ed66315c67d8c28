#!/usr/bin/env python3
"""Summarize an Nsight Compute per-instruction export (scripts/ncu-profile.sh's src_v*.csv):
executed warp instructions and stall samples by opcode, the stall reasons, the most-sampled
instructions, and with --loop the hot loop's instructions in order (execution count ≥ a share of
the maximum) with their samples: where a kernel's issue slots and stalls go, per instruction."""
import argparse
import collections
import csv
import re


def load(path):
    rows = list(csv.reader(open(path, encoding="utf-8")))
    head = rows[1]  # row 0 names the kernel
    ix = {h: i for i, h in enumerate(head)}
    stall_cols = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]
    out = []
    for r in rows[2:]:
        if len(r) < len(head):
            continue
        src = r[ix["Source"]].strip()
        op = re.sub(r"^@!?U?P\w+\s+", "", src).split()[0].split(".")[0] if src else "?"
        out.append(
            dict(
                addr=r[ix["Address"]],
                src=src,
                op=op,
                executed=int(r[ix["Instructions Executed"]] or 0),
                samples=int(r[ix["Warp Stall Sampling (All Samples)"]] or 0),
                stalls={c[6:]: int(r[ix[c]] or 0) for c in stall_cols},
            )
        )
    return rows[0][1] if len(rows[0]) > 1 else "?", out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25, help="most-sampled instructions to list")
    ap.add_argument("--loop", action="store_true", help="list the hot loop's instructions in order")
    a = ap.parse_args()
    kernel, ins = load(a.csv)
    total = sum(i["executed"] for i in ins)
    samples = sum(i["samples"] for i in ins) or 1
    print(f"{kernel}\nexecuted warp instructions: {total:,}; stall samples: {samples:,}")
    by_op, by_op_s, stalls = collections.Counter(), collections.Counter(), collections.Counter()
    for i in ins:
        by_op[i["op"]] += i["executed"]
        by_op_s[i["op"]] += i["samples"]
        stalls.update(i["stalls"])
    print("| opcode | executed | samples |\n|---|---|---|")
    for op, n in by_op.most_common(20):
        print(f"| {op} | {100 * n / total:.1f} % | {100 * by_op_s[op] / samples:.1f} % |")
    print("stalls: " + ", ".join(f"{k} {100 * v / samples:.1f} %" for k, v in stalls.most_common(10)))
    print(f"top {a.top} sampled instructions:")
    for i in sorted(ins, key=lambda i: -i["samples"])[: a.top]:
        why = ", ".join(f"{k} {v}" for k, v in sorted(i["stalls"].items(), key=lambda kv: -kv[1])[:3] if v)
        print(f"  {i['addr'][-5:]} {i['samples']:5d} x{i['executed']:<8d} {i['src'][:64]:64s} {why}")
    if a.loop:
        hot = max(i["executed"] for i in ins)
        print("hot loop (executed ≥ 90 % of the most-executed instruction), in order:")
        for i in ins:
            if i["executed"] >= 0.9 * hot:
                print(f"  {i['addr'][-5:]} {i['samples']:5d} {i['src'][:80]}")


if __name__ == "__main__":
    main()
