"""Plot an end-to-end benchmark JSON (benchmarks/bench_e2e.py): latency split per method and context.

    python benchmarks/plot_e2e.py benchmarks/results/e2e_<device>.json   # writes the .png beside it
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PARTS = (("score_s", "scoring"), ("build_s", "cache build"), ("decode_s", "decode steps"))


def main(path: str):
    data = json.loads(Path(path).read_text())
    runs = [r for r in data["runs"] if "error" not in r]
    contexts = sorted({r["context_tokens"] for r in runs})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    batched = data.get("batched", [])
    floors = data.get("floors")
    panels = len(contexts) + bool(batched) + bool(floors)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.8), sharey=False)
    for ax, n in zip(axes, contexts):
        rows = {r["method"]: r for r in runs if r["context_tokens"] == n}
        names = [m for m in methods if m in rows]
        bottom = [0.0] * len(names)
        for key, label in PARTS:
            vals = [rows[m][key] for m in names]
            ax.bar(names, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, m in enumerate(names):
            ratio = rows[m].get("speedup_vs_vanilla")
            if ratio and m != "vanilla":
                ax.text(i, bottom[i], f"{ratio:.0f}x", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{n // 1024}K context", fontsize=9)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    axes[0].set_ylabel("end-to-end seconds")
    axes[len(contexts) - 1].legend(fontsize=7)
    if batched:  # output tokens/s of one batch of requests, and the split of its time
        ax = axes[-1]
        sizes = [str(r["batch"]) for r in batched]
        ax.bar(sizes, [r["output_tokens_per_s"] for r in batched], color="tab:purple")
        for i, r in enumerate(batched):
            ax.text(i, r["output_tokens_per_s"], f"{r['score_s'] / r['total_s']:.0%} scoring", ha="center",
                    va="bottom", fontsize=7)
        ax.set_xlabel("batch size")
        ax.set_title(f"{batched[0]['method']} at {batched[0]['context_tokens'] // 1024}K: output tok/s", fontsize=9)
    if floors:  # the synthetic decode step of each block backend beside its two floors
        ax = axes[len(contexts) + bool(batched)]
        bars = {f"{b} (graph)": floors[b]["decode_step_graph_ms"] for b in ("eager", "compiled") if b in floors}
        bars["GEMMs alone"] = floors["decode_gemm"]["gemm_ms"]
        bars["weights at copy rate"] = floors["decode_gemm"]["weight_read_ms"]
        ax.bar(list(bars), list(bars.values()), color=["tab:blue"] * (len(bars) - 2) + ["tab:gray", "tab:gray"])
        for i, v in enumerate(bars.values()):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_ylabel("ms per decode step (32 rows, 4228 cached)", fontsize=7)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        best = max(floors[b]["scoring_linear_tflops"] for b in ("eager", "compiled") if b in floors)
        ax.set_title(f"decode step vs floors; scoring {best:.0f} TFLOP/s", fontsize=9)
    env = data["environment"]
    fig.suptitle(f"LLaDA-8B shape, gen 32 / block 32 / 32 steps, top-4 x 1024 — {env.get('device', env.get('gpu'))}, "
                 f"torch {env['torch']}, triton {env['triton']} (speedup vs vanilla above bars)", fontsize=8)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=130)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1])
