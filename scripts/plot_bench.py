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
def rows(path):
    """Rows of a harness table: | model | g | L | batch | µs | roofline | × | frac | stock [| 8-bit | 4-bit] |."""
    out = []
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 9 or not re.fullmatch(r"\d+K", cells[2]) or not cells[0].startswith(("llama", "smol")):
            continue
        num = lambda c: float(re.match(r"[\d.]+", c).group(0)) if re.match(r"[\d.]+", c) else None
        out.append(dict(model=cells[0], g=int(cells[1]), L=int(cells[2][:-1]) * 1024, B=int(cells[3]),
                        us=float(cells[4]), roof=float(cells[5]), frac=float(cells[7].rstrip("%")),
                        stock=num(cells[8]), b8=num(cells[9]) if len(cells) > 10 else None,
                        b4=num(cells[10]) if len(cells) > 10 else None,
                        fused=num(cells[11]) if len(cells) > 12 else None,
                        fused4=num(cells[12]) if len(cells) > 12 else None))
    return out


def latency_axes(ax, title):
    """Log-log µs-per-step axes of a latency-vs-context panel."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length L (tokens)")
    ax.set_ylabel("µs per layer per decode step")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def speedup_plot():
    """Speed-up over the stock kernel (same run) per variant, with the issue's 3x and 6x bars."""
    fused = rows(ROOT / "docs/bench/palu_decode_v6_fused.md")
    stop10 = rows(ROOT / "docs/bench/palu_decode_v6_stop10.md")
    panels = [("Llama-3-8B shape, batch 8", fused, "llama3-8b", 8), ("Llama-3-8B shape, batch 32", fused, "llama3-8b", 32),
              ("Llama-2-7B shape (MHA), batch 8", stop10, "llama2-7b", 8)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), sharey=True)
    for ax, (title, table, model, B) in zip(axes, panels):
        r = [x for x in table if x["model"] == model and x["g"] == 1 and x["B"] == B and x["stock"]]
        L = [x["L"] for x in r]
        for key, style, color, label in [("us", "o-", "C0", "fp16 latents"), ("fused", "o--", "C1", "fp16 latents, fused values"),
                                         ("b4", "D-", "C2", "4-bit latents"), ("fused4", "D--", "C3", "4-bit latents, fused values")]:
            pts = [(x["L"], x["stock"] / x[key]) for x in r if x.get(key)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label)
        for bar, ls, label in [(1, "-", "stock"), (3, ":", "target 3x (fp16)"), (6, "-.", "target 6x (4-bit)")]:
            ax.axhline(bar, color="k", ls=ls, lw=0.8, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length L (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up over mistral.rs paged attention (same run)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/decode_speedup_vs_stock.svg")


def serve_plot():
    """End-to-end decode tokens/s per server (serve-bench, stop 11), stock paged attention beside."""
    shapes, cur = {}, None
    for line in (ROOT / "docs/bench/paged_stop11.md").read_text().splitlines():
        m = re.match(r"(\d+) streams × (\d+) prompt tokens", line)
        if m:
            cur = f"{m.group(1)} × {int(m.group(2)) // 1024}K"
            shapes[cur] = {}
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cur is None or not line.startswith("| ") or cells[0] in ("cache",) or cells[0].startswith("---"):
            continue
        name = (cells[0].replace("--kv-cache palu, ", "palu ").replace(" latents", "")
                .replace("in paged blocks (block 32)", "paged").replace("stock, paged attention (block 32)", "stock paged"))
        tps = float(cells[3]) if len(cells) > 3 and re.fullmatch(r"[\d.]+", cells[3]) else None
        shapes[cur][name] = tps
    shapes = {k: v for k, v in shapes.items() if v}  # 16 × 32K: no result came back
    servers = ["stock paged", "palu 16-bit", "palu 4-bit", "palu 16-bit paged", "palu 4-bit paged"]
    colors = ["#c44", "#48c", "#8bd", "#262", "#8c8"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.16
    for i, (shape, row) in enumerate(shapes.items()):
        for j, (srv, col) in enumerate(zip(servers, colors)):
            if srv not in row:
                continue
            x = i + (j - 2) * width
            v = row[srv]
            if v is None:
                ax.text(x, 50, "fails", rotation=90, ha="center", va="bottom", fontsize=8, color=col)
                continue
            ax.bar(x, v, width, color=col, label=srv if i == 0 or srv not in shapes[list(shapes)[0]] else None)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(list(shapes))
    ax.set_xlabel("streams × prompt tokens (128 new tokens each; 64 at 16 × 16K)")
    ax.set_ylabel("decode tokens/s (all streams)")
    ax.set_title("serve-bench on the H200: Llama-3-8B shape (4 layers, random weights), bf16")
    handles, labels = ax.get_legend_handles_labels()
    seen = {}
    for h, l in zip(handles, labels):
        seen.setdefault(l, h)
    ax.legend(seen.values(), seen.keys(), fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/serve_bench_stop11.svg")


def table(path):
    """Rows of a harness table by its header's column names (stop 12 on): dicts of the cells'
    leading numbers (None for "–", "aborts", "fails"), plus model, g, L (tokens), B."""
    lines = Path(path).read_text().splitlines()
    out, head = [], None
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == "shape":
            head = cells
            continue
        if head is None or len(cells) != len(head) or not re.fullmatch(r"\d+K", cells[2]):
            continue
        num = lambda c: float(re.match(r"[\d.]+", c).group(0)) if re.match(r"[\d.]+", c) else None
        row = {h: num(c) for h, c in zip(head, cells)}
        row.update(model=cells[0], g=int(cells[1]), L=int(cells[2][:-1]) * 1024, B=int(cells[3]))
        out.append(row)
    return out


def decode_plots(t, tag, before=None, llama2=None):
    """Latency vs context per group size (fp16 and 4-bit latents) beside the stock kernel on its
    bf16 and f8e4m3 caches and the roofline; and × roofline / rebuild TFLOP/s per group size.
    before: an earlier run's table, drawn as grey g = 1 lines; llama2: the Llama-2 rows, drawn
    dashed in the roofline panels."""
    fp16, four = "Palu-50% fp16 µs", "4-bit µs (× roofline, × stock)"
    stock, stock8 = "stock paged attn bf16 µs, same run (speed-up)", "stock f8e4m3 cache µs (speed-up)"
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    colors = {1: "#262", 2: "#48c", 4: "#c80"}
    for ax, B in zip(axes, [8, 32]):
        r1 = [x for x in t if x["model"] == "llama3-8b" and x["g"] == 1 and x["B"] == B]
        for g in (1, 2, 4):
            r = [x for x in t if x["model"] == "llama3-8b" and x["g"] == g and x["B"] == B]
            ax.plot([x["L"] for x in r], [x[fp16] for x in r], "o-", color=colors[g], label=f"Palu-50% g={g}, fp16 latents")
            ax.plot([x["L"] for x in r], [x[four] for x in r], "D:", color=colors[g], label=f"g={g}, 4-bit latents")
        if before:
            rb = [x for x in before if x["model"] == "llama3-8b" and x["g"] == 1 and x["B"] == B]
            ax.plot([x["L"] for x in rb], [x[fp16] for x in rb], "o:", color="gray", label="g=1 fp16, previous stop")
        st = [x for x in r1 if x[stock]]
        ax.plot([x["L"] for x in st], [x[stock] for x in st], "r^-", label="stock paged attention, bf16 cache")
        st8 = [x for x in r1 if x[stock8]]
        ax.plot([x["L"] for x in st8], [x[stock8] for x in st8], "rv--", label="stock, f8e4m3 cache")
        ax.plot([x["L"] for x in r1], [x["roofline bf16 K/V µs"] for x in r1], "k--", label="roofline: bf16 K/V read once")
        latency_axes(ax, f"Llama-3-8B attention shape, batch {B} (stock aborts at 64K+ × 32)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / f"docs/img/decode_latency_{tag}.svg")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for g in (1, 2, 4):
        for rows_, model, style, name in ((t, "llama3-8b", "o-", "Llama-3"), (llama2 or [], "llama2-7b", "s--", "Llama-2")):
            r = [x for x in rows_ if x["model"] == model and x["g"] == g and x["B"] == 8]
            if not r:
                continue
            axes[0].plot([x["L"] for x in r], [x["× roofline"] for x in r], style, color=colors[g], label=f"{name} g={g} fp16")
            axes[1].plot([x["L"] for x in r], [x["rebuild TFLOP/s"] for x in r], style, color=colors[g], label=f"{name} g={g}")
    axes[0].axhline(0.6, color="k", ls=":", label="target g=1: 0.6×")
    axes[0].axhline(1.0, color="k", ls="--", label="target g=4: 1.0×")
    axes[0].set_ylabel("time ÷ roofline (bf16 K/V read once)")
    axes[1].set_ylabel("rebuild TFLOP/s (2·g·dh·r per token and group)")
    axes[1].axhline(550, color="k", ls="--", label="g=4 at 1.0× roofline needs ≥ 550")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length L (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("batch 8: fraction of the roofline")
    axes[1].set_title("batch 8: the rebuild's tensor-core rate")
    fig.tight_layout()
    fig.savefig(ROOT / f"docs/img/decode_roofline_{tag}.svg")


def stop_plots(stop, before=None):
    """The decode plots of one stop's harness run (docs/bench/palu_decode_stopN.md, and its
    Llama-2 run where there is one), with an earlier stop's g = 1 rows in grey."""
    bench = ROOT / "docs/bench"
    llama2 = bench / f"palu_decode_stop{stop}_llama2.md"
    decode_plots(
        table(bench / f"palu_decode_stop{stop}.md"),
        f"stop{stop}",
        before=table(bench / f"palu_decode_stop{before}.md") if before else None,
        llama2=table(llama2) if llama2.exists() else None,
    )


def serve_stop14_plot():
    """Decode tokens/s, Palu (latents in paged blocks) vs stock paged attention, from the stop-14
    serve-bench log lines ("... decode D s for N tokens (T tok/s)") after the early-stop fix."""
    text = (ROOT / "docs/bench/serve_bench_stop14.md").read_text()
    after = text[text.index("## After the fix"):]
    runs, cur = {}, None
    for line in after.splitlines():
        m = re.match(r"== (\d+) x (\d+) gen (\d+)", line)
        if m:
            cur = f"{m.group(1)} × {int(m.group(2)) // 1024}K"
            runs[cur] = {}
            continue
        m = re.search(r"\(([\d.]+) tok/s\)", line)
        if cur and m:
            runs[cur]["stock" if line.startswith("stock") else "palu"] = float(m.group(1))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (shape, r) in enumerate(runs.items()):
        ax.bar(i - 0.18, r.get("palu", 0), 0.36, color="#262", label="--kv-cache palu, 16-bit latents, paged" if i == 0 else None)
        if "stock" in r:
            ax.bar(i + 0.18, r["stock"], 0.36, color="#c44", label="stock, paged attention" if i == 0 else None)
            ax.text(i, max(r.values()) * 1.02, f"{r['palu'] / r['stock']:.2f}×", ha="center", fontsize=9)
        else:
            ax.text(i + 0.18, 60, "stock cannot run\n(candle#3604)", rotation=90, ha="center", va="bottom", fontsize=8, color="#c44")
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(list(runs))
    ax.set_xlim(-0.6, len(runs) - 0.4)
    ax.set_ylim(0, 1.25 * max(v for r in runs.values() for v in r.values()))
    ax.set_xlabel("streams × prompt tokens")
    ax.set_ylabel("decode tokens/s (all streams)")
    ax.set_title("serve-bench, H200: Llama-3-8B shape, 4 layers, random weights, bf16")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/serve_bench_stop14.svg")


def main():
    versions = {v: rows(ROOT / f"docs/bench/palu_decode_{v}.md") for v in ["v1", "v2", "v3", "v4", "v5", "v6"]}
    v5 = rows(ROOT / "docs/bench/palu_decode_v5_stock.md")
    v6 = versions["v6"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, B in zip(axes, [1, 8, 32]):
        r = [x for x in v6 if x["model"] == "llama3-8b" and x["g"] == 1 and x["B"] == B]
        ax.plot([x["L"] for x in r], [x["us"] for x in r], "o-", label="Palu-50% g=1 fp16 latents (v6)")
        ax.plot([x["L"] for x in r], [x["b8"] for x in r], "v-", label="8-bit packed latents (v6)")
        ax.plot([x["L"] for x in r], [x["b4"] for x in r], "D-", label="4-bit packed latents (v6)")
        r2 = [x for x in v6 if x["model"] == "llama3-8b" and x["g"] == 2 and x["B"] == B]
        ax.plot([x["L"] for x in r2], [x["us"] for x in r2], "s-", label="Palu-50% g=2 fp16 (v6)")
        r5 = [x for x in v5 if x["model"] == "llama3-8b" and x["g"] == 1 and x["B"] == B]
        ax.plot([x["L"] for x in r5], [x["us"] for x in r5], "o:", color="gray", label="g=1 fp16, v5 (before)")
        ax.plot([x["L"] for x in r], [x["roof"] for x in r], "k--", label="roofline: bf16 K/V read once")
        ax.plot([x["L"] for x in r], [0.6 * x["roof"] for x in r], "k:", label="target 0.6× roofline")
        st = [x for x in r if x["stock"]]
        if st:
            ax.plot([x["L"] for x in st], [x["stock"] for x in st], "r^", label="stock paged attn bf16 (same run)")
        latency_axes(ax, f"Llama-3-8B attention shape, batch {B}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/decode_latency_llama3.svg")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v, style in [("v1", "x-"), ("v2", "d-"), ("v3", "s-"), ("v4", "o-"), ("v5", "*-"), ("v6", "P-")]:
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
    speedup_plot()
    serve_plot()
    stop_plots(12)
    stop_plots(13, before=12)
    stop_plots(14, before=13)
    serve_stop14_plot()
    print("wrote docs/img/decode_latency_llama3.svg, docs/img/decode_bandwidth_versions.svg, docs/img/decode_speedup_vs_stock.svg, "
          "docs/img/serve_bench_stop11.svg, docs/img/decode_{latency,roofline}_stop12.svg, docs/img/decode_{latency,roofline}_stop13.svg, "
          "docs/img/decode_{latency,roofline}_stop14.svg, docs/img/serve_bench_stop14.svg")


if __name__ == "__main__":
    main()
