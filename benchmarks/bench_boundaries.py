"""A needle cut by a chunk boundary: the remedies side by side on the toy model, on the same examples.

Remedies (each a stage of the selection pipeline): ``snapped`` chunk boundaries (each cut moved to
the strongest sentence / line / paragraph end near it: free at scoring time), ``overlap`` chunks
(each reaches ``chunk_overlap`` tokens into its neighbours: scoring and kept rows grow), and
``keep_margin`` (the kept chunks widened into their neighbours: only the decode's rows grow);
beside them today's fixed chunks, fixed chunks without BOS anchors, and the dense model (vanilla)
on the same examples. Two sets of examples per task and length: needles at the eval grid's depths
(0, 1/4, 1/2, 3/4, 1: the middle ones fall on the 128-token grid, where fixed chunks cut them) and
needles at random depths.

Reported per method, task, length and set: exact match with its 95% interval, recall (every token
of the needle in a kept chunk), how many needles a boundary cut and the accuracy and recall on
them and on the rest, the paired difference to dense, and the wall time. JSON with every
per-example outcome. The cost side at the LLaDA-8B shape is bench_e2e.py's (prefill-attention,
fixed chunks, against prefill-snapped).

    python benchmarks/bench_boundaries.py --out benchmarks/results/boundaries_<device>.json
    python benchmarks/bench_boundaries.py --smoke            # a few examples, CPU: the script runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pdllm.data.synthetic import TASKS, make_examples, make_grid
from pdllm.environment import environment
from pdllm.eval.harness import cell_summary, run_examples
from pdllm.eval.metrics import paired_difference
from pdllm.loading import EMBEDDED_MODEL, load_model
from pdllm.sampler import GenerationConfig

BASE = dict(chunk_size=128, top_k=4, score_batch=64)  # the toy model's chunks
METHODS = {  # label -> (sampler method, prefill knobs over BASE)
    "dense": ("vanilla", None),
    "fixed": ("prefill", dict(chunking="bos_added")),
    "fixed_no_bos": ("prefill", dict(chunking="bos_added", chunk_bos=False)),
    "snapped": ("prefill", dict(chunking="snapped")),
    "snapped_no_bos": ("prefill", dict(chunking="snapped", chunk_bos=False)),
    "overlap16": ("prefill", dict(chunking="overlap", chunk_overlap=16)),
    "margin16": ("prefill", dict(chunking="bos_added", keep_margin=16)),
    "snapped_margin16": ("prefill", dict(chunking="snapped", keep_margin=16)),
}


def example_sets(tok, task: str, length: int, n: int, seed: int) -> dict:
    """n needles at the grid's five depths and n at random depths, each example its own seed."""
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    grid = make_grid(task, [length], depths, n_per_cell=max(1, n // len(depths)), seed=seed, tokenizer=tok.tk)
    return {"grid_depths": [e for d in depths for e in grid[(length, d)]],
            "random_depths": make_examples(task, n, length, seed=f"{seed}.random", tokenizer=tok.tk)}


def plot(report: dict, path: Path):
    """Per length and task: each method's exact match over all needles and over the cut ones (95%
    intervals), both depth sets pooled, dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pdllm.eval.metrics import wilson_interval

    cells = [(L, t, sets) for L, tasks in report["cells"].items() for t, sets in tasks.items()]
    fig, axes = plt.subplots(1, len(cells), figsize=(4.5 * len(cells), 3.6), squeeze=False)
    for ax, (L, task, sets) in zip(axes[0], cells):
        methods = [m for m in next(iter(sets.values())) if m != "dense"]
        for k, (part, colour) in enumerate((("all", "C0"), ("cut", "C3"))):
            values, errors = [], [[], []]
            for m in methods:
                hits = n = 0
                for cell in sets.values():
                    c = cell[m] if part == "all" else cell[m]["cut"]
                    hits, n = hits + round(c["accuracy"] * c["n"]), n + c["n"]
                lo, hi = wilson_interval(hits, n) if n else (0.0, 0.0)  # no needle cut: no bar
                acc = hits / max(1, n)
                values.append(acc)
                errors[0].append(max(0.0, acc - lo))
                errors[1].append(max(0.0, hi - acc))
            xs = [i + (k - 0.5) * 0.38 for i in range(len(methods))]
            ax.bar(xs, values, 0.38, yerr=errors, color=colour, label=f"{part} needles" if part == "all" else
                   "needles its chunking cut")
        dense = [cell["dense"] for cell in sets.values() if "dense" in cell]
        if dense:
            ax.axhline(sum(d["accuracy"] * d["n"] for d in dense) / sum(d["n"] for d in dense), color="k",
                       linestyle="--", label="dense")
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{task}, {L} tokens", fontsize=9)
    axes[0][0].set_ylabel("exact match")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--n", type=int, default=100, help="examples per task, length and depth set")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dense", choices=("vanilla", "dual"), default="vanilla",
                   help="the dense reference: vanilla (every step the whole sequence) or the dual cache (a CPU's choice)")
    p.add_argument("--device", default=None)
    p.add_argument("--smoke", action="store_true", help="2 examples, 1 task, 512 tokens: check the script runs")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="plot a report JSON (no run) to a PNG beside it")
    args = p.parse_args(argv)
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return None
    if args.smoke:
        args.lengths, args.tasks, args.n = [512], args.tasks[:1], 2
    model, tok = load_model(EMBEDDED_MODEL, args.device)
    gen = GenerationConfig(gen_length=16, block_length=16, steps=16)
    report = {"environment": environment(), "model": "embedded toy", "prefill": BASE, "methods": {
        label: {"method": args.dense if label == "dense" else m, "knobs": k}
        for label, (m, k) in METHODS.items() if label in args.methods},
        "generation": {"gen_length": 16, "block_length": 16, "steps": 16}, "n": args.n, "cells": {}}
    for L in args.lengths:
        for task in args.tasks:
            for set_name, examples in example_sets(tok, task, L, args.n, seed=27).items():
                cell, flags = {}, {}
                for label in args.methods:
                    method, knobs = METHODS[label]
                    method = args.dense if label == "dense" else method
                    t0 = time.perf_counter()
                    records = run_examples(model, tok, examples, gen, method, args.batch_size,
                                           **({} if knobs is None else {**BASE, **knobs}))
                    cell[label] = cell_summary(records)
                    cell[label]["wall_s"] = time.perf_counter() - t0
                    flags[label] = [r["correct"] for r in records]
                for label in cell:
                    if label != "dense" and "dense" in flags:
                        cell[label]["minus_dense"] = list(paired_difference(flags[label], flags["dense"]))
                report["cells"].setdefault(str(L), {}).setdefault(task, {})[set_name] = cell
                line = "  ".join(f"{label} {c['accuracy']:.2f}" + (f"/{c['recall']:.2f} cut {c['cut']['n']}"
                                                                      if "cut" in c else "")
                                 for label, c in cell.items())
                print(f"{L:>5} {task:<16} {set_name:<13} {line}", flush=True)
                if args.out:
                    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
