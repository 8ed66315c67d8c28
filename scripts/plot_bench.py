#!/usr/bin/env python3
"""Plots for docs/benchmarks.md from the H200 harness tables in docs/bench/*.md.

usage: python3 scripts/plot_bench.py   (needs matplotlib)
"""
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"\| (\S+) \| (\d) \| (\d+)K \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \| (.*) \|")


def rows(path):
    out = []
    for line in Path(path).read_text().splitlines():
        m = ROW.match(line)
        if m:
            model, g, L, B, us, roof, x, frac, stock = m.groups()
            s = re.match(r"(\d+) ", stock)
            out.append(dict(model=model, g=int(g), L=int(L) * 1024, B=int(B), us=float(us), roof=float(roof),
                            frac=float(frac), stock=float(s.group(1)) if s else None))
    return out


def main():
    versions = {v: rows(ROOT / f"docs/bench/palu_decode_{v}.md") for v in ["v1", "v2", "v3", "v4", "v5"]}
    v4 = rows(ROOT / "docs/bench/palu_decode_v5_stock.md")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, B in zip(axes, [1, 8, 32]):
        for g, style in [(1, "o-"), (2, "s-")]:
            r = [x for x in v4 if x["model"] == "llama3-8b" and x["g"] == g and x["B"] == B]
            ax.plot([x["L"] for x in r], [x["us"] for x in r], style, label=f"Palu-50% g={g} (v5)")
        r = [x for x in v4 if x["model"] == "llama3-8b" and x["g"] == 1 and x["B"] == B]
        ax.plot([x["L"] for x in r], [x["roof"] for x in r], "k--", label="roofline: bf16 K/V read once")
        ax.plot([x["L"] for x in r], [0.6 * x["roof"] for x in r], "k:", label="target 0.6× roofline")
        st = [x for x in r if x["stock"]]
        if st:
            ax.plot([x["L"] for x in st], [x["stock"] for x in st], "r^", label="stock paged attn (same run)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length L (tokens)")
        ax.set_ylabel("µs per layer per decode step")
        ax.set_title(f"Llama-3-8B attention shape, batch {B}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/decode_latency_llama3.svg")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v, style in [("v1", "x-"), ("v2", "d-"), ("v3", "s-"), ("v4", "o-"), ("v5", "*-")]:
        r = [x for x in versions[v] if x["model"] == "llama3-8b" and x["g"] == 1 and x["B"] == 8]
        # v1-v3 tables were recomputed with the same roofline; fraction = latent bytes / copy BW
        ax.plot([x["L"] for x in r], [x["frac"] for x in r], style, label=v)
    ax.axhline(100 * 0.5 / 0.6, color="k", ls=":", label="needed for 0.6× roofline (83%)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length L (tokens)")
    ax.set_ylabel("latent bytes/s ÷ copy bandwidth (%)")
    ax.set_title("Fraction of HBM bandwidth, Llama-3-8B shape, g=1, batch 8")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/decode_bandwidth_versions.svg")
    print("wrote docs/img/decode_latency_llama3.svg, docs/img/decode_bandwidth_versions.svg")


if __name__ == "__main__":
    main()
