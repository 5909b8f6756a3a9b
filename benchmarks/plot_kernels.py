"""Plot a ``pytest --benchmark --benchmark-json=FILE`` run of bench_chunk_attention.py.

    python benchmarks/plot_kernels.py benchmarks/results/kernels_NVIDIA_H100_80GB_HBM3.json [-o out.png]

Left: time (do_bench median, us) per shape and implementation. Right: achieved bandwidth of the
bytes each shape needs (selected K/V + q + out) against the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMPLS = ["pdllm", "sdpa_gather", "flex", "sdpa_dense"]
COLORS = {"pdllm": "tab:red", "sdpa_gather": "tab:blue", "flex": "tab:green", "sdpa_dense": "tab:gray"}


def load(path):
    data = json.loads(Path(path).read_text())
    rows = [b["extra_info"] for b in data["benchmarks"] if "time_us" in b.get("extra_info", {})]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    table = {(r["shape"], r["impl"]): r for r in rows}
    return data, rows, shapes, table


def plot(path, out=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, rows, shapes, table = load(path)
    if not rows:
        raise SystemExit(f"{path}: no benchmark with extra_info.time_us")
    info = rows[0]
    gpu = data.get("machine_info", {}).get("gpu") or {}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(20, 5.5))
    width = 0.8 / len(IMPLS)
    copy = info["copy_gbps"]
    panels = [(ax2, "gbps", "pct_copy_bw", "do_bench (L2 flushed)"),
              (ax3, "gbps_rotating", "pct_copy_bw_rotating", "CUDA graph, rotating layers")]
    for i, impl in enumerate(IMPLS):
        present = [(j, s) for j, s in enumerate(shapes) if (s, impl) in table]
        xs = [j + (i - 1.5) * width for j, _ in present]
        ax1.bar(xs, [table[(s, impl)]["time_us"] for _, s in present], width, label=impl, color=COLORS[impl])
        for ax, gb, _, _ in panels:
            ax.bar(xs, [table[(s, impl)].get(gb, 0) for _, s in present], width, label=impl, color=COLORS[impl])
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=30)
    ax1.set_yscale("log")
    ax1.set_ylabel("time, us (do_bench median, log scale)")
    ax1.legend()
    for ax, gb, pct, title in panels:
        ax.axhline(copy, color="k", ls="--", lw=1, label=f"copy {copy:.0f} GB/s")
        ax.axhline(0.7 * copy, color="k", ls=":", lw=1, label="70% of copy")
        for j, s in enumerate(shapes):
            r = table.get((s, "pdllm"))
            if r and gb in r:
                ax.annotate(f"{r[pct]:.0f}%", (j - 1.5 * width, r[gb]), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("GB/s of the needed bytes (selected K/V + q + out)")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"chunk attention, {info['heads']} q heads / {info['kv_heads']} kv heads, D={info['head_dim']}, "
        f"Tq={info['q_rows']}, {info['dtype']} on {info.get('device')} "
        f"(torch {gpu.get('torch', '?')}, triton {gpu.get('triton', '?')}, driver {gpu.get('driver', '?')})",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(out) if out else Path(path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("-o", "--out")
    args = p.parse_args(argv)
    print(plot(args.json, args.out))


if __name__ == "__main__":
    main()
