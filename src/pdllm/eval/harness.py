"""``pdllm eval``: what sparse prefill does to answers.

* the grid: accuracy of each method over needle depth x context length, per synthetic task;
* ablations of Prefilling-dLLM at the longest length: BOS anchors, K, chunk size, token capacity,
  scoring mode, cache build mode, position mode — each one knob away from the default;
* LongBench / InfiniteBench files from a local directory, scored with their own metrics.

Results are JSON (every setting next to its numbers) plus matplotlib plots: a depth x length
heatmap per method and task, and accuracy against K.

    pdllm eval --out runs/eval                      # grid + ablations on the embedded model
    pdllm eval --model DIR --longbench ~/LongBench/data --tasks hotpotqa --limit 50
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from pdllm.sampler import GenerationConfig, generate

DEFAULT_PREFILL = dict(chunk_size=64, top_k=4)  # the toy model's chunk size: 16 chunks at 1024 tokens
ABLATIONS = {  # name -> list of (label, prefill overrides)
    "chunk_bos": [("bos", dict(chunk_bos=True)), ("no_bos", dict(chunk_bos=False))],
    "top_k": [(f"k={k}", dict(top_k=k)) for k in (1, 2, 4, 8, 16)],
    # Two knobs: K without BOS anchors. With every chunk kept and no anchors, prefill is the dense
    # model again (continuous positions then have no gaps), so k=16 here should match the dense line.
    "top_k_no_bos": [(f"k={k}", dict(top_k=k, chunk_bos=False)) for k in (1, 2, 4, 8, 16)],
    "chunk_size": [(f"chunk={c}", dict(chunk_size=c, top_k=max(1, 256 // c))) for c in (32, 64, 128)],
    "token_capacity": [(f"cap={c}", dict(token_capacity=c)) for c in (None, 48, 32, 16)],
    "score": [("attention", dict(score="attention")), ("draft", dict(score="draft"))],
    "cache_mode": [("full_prompt_mask", dict(cache_mode="full_prompt_mask")), ("chunk_query", dict(cache_mode="chunk_query"))],
    "positions": [(p, dict(positions=p)) for p in ("continuous", "reuse", "absolute")],
}


def answer_batch(model, tok, prompts, gen: GenerationConfig, method: str, **kwargs) -> tuple[list[str], float]:
    """Decode a batch; returns the answers (text up to EOS) and the wall time."""
    t0 = time.perf_counter()
    out = generate(model, prompts, gen, method=method, pad_id=tok.eos_id, **kwargs)
    return [tok.decode(ids).strip() for ids in out.tokens.tolist()], time.perf_counter() - t0


def synthetic_accuracy(model, tok, examples, gen, method, batch_size, **kwargs) -> dict:
    """Exact-match accuracy (and time) of one method on synthetic examples."""
    correct, seconds = [], 0.0
    for i in range(0, len(examples), batch_size):
        part = examples[i : i + batch_size]
        prompts = [tok.long_context_prompt(e.context, e.question) for e in part]
        answers, dt = answer_batch(model, tok, prompts, gen, method, **kwargs)
        seconds += dt
        correct += [a == e.answer for a, e in zip(answers, part)]
    return {"accuracy": sum(correct) / max(1, len(correct)), "n": len(correct), "seconds": seconds}


def run_grid(model, tok, tasks, lengths, depths, n, methods, gen, batch_size, prefill) -> dict:
    from pdllm.data.synthetic import make_grid

    results = {}
    cells = [(t, L, d) for t in tasks for L in lengths for d in depths]
    bar = tqdm(total=len(cells) * len(methods), desc="grid", unit="cell")
    for task in tasks:
        grid = make_grid(task, lengths, depths, n, seed="eval", tokenizer=tok.tk)
        for (L, d), examples in grid.items():
            for method in methods:
                kwargs = prefill if method == "prefill" else {}
                r = synthetic_accuracy(model, tok, examples, gen, method, batch_size, **kwargs)
                results.setdefault(method, {}).setdefault(task, {}).setdefault(str(L), {})[str(d)] = r
                bar.update(1)
    bar.close()
    return results


def run_ablations(model, tok, tasks, length, n, gen, batch_size, prefill, which) -> dict:
    """Each setting of ``which`` on the same examples, and the dense model (``vanilla``) on them
    too (key ``"dense"``), so that every setting reads as a share of dense accuracy."""
    from pdllm.data.synthetic import make_examples

    examples = {t: make_examples(t, n, length, seed="ablation", tokenizer=tok.tk) for t in tasks}
    dense = {t: synthetic_accuracy(model, tok, ex, gen, "vanilla", batch_size) for t, ex in examples.items()}
    results = {"dense": {"accuracy": sum(r["accuracy"] for r in dense.values()) / len(dense), "tasks": dense}}
    settings = [(name, label, over) for name in which for label, over in ABLATIONS[name]]
    for name, label, over in tqdm(settings, desc="ablations", unit="setting"):
        kwargs = {**prefill, **over}
        per_task = {t: synthetic_accuracy(model, tok, ex, gen, "prefill", batch_size, **kwargs) for t, ex in examples.items()}
        mean = sum(r["accuracy"] for r in per_task.values()) / len(per_task)
        results.setdefault(name, []).append({"label": label, "prefill": kwargs, "accuracy": mean, "tasks": per_task})
    return results


def run_benchmark(model, tok, examples, method, prefill, max_gen: int | None) -> dict:
    """LongBench/InfiniteBench examples one at a time (their answers have different lengths)."""
    per_task: dict[str, list[float]] = {}
    for ex in tqdm(examples, desc=f"{method}", unit="example"):
        gen_len = min(ex.max_new_tokens, max_gen or ex.max_new_tokens)
        gen = GenerationConfig(gen_length=gen_len, block_length=gen_len, steps=gen_len, threshold=0.9)
        prompt = tok.long_context_prompt(ex.context, ex.question, instruction=ex.prefix, question_template="{question}")
        kwargs = prefill if method == "prefill" else {}
        (answer,), _ = answer_batch(model, tok, [prompt], gen, method, **kwargs)
        per_task.setdefault(ex.task, []).append(ex.score(answer))
    return {task: {"score": sum(s) / len(s), "n": len(s)} for task, s in per_task.items()}


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def plot_heatmaps(grid: dict, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(grid)
    tasks = list(grid[methods[0]])
    fig, axes = plt.subplots(len(tasks), len(methods), figsize=(3.2 * len(methods), 2.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, method in enumerate(methods):
            cells = grid[method][task]
            lengths = list(cells)
            depths = list(cells[lengths[0]])
            acc = [[cells[L][d]["accuracy"] for L in lengths] for d in depths]
            ax = axes[i][j]
            ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), lengths, fontsize=7)
            ax.set_yticks(range(len(depths)), depths, fontsize=7)
            for y, row in enumerate(acc):
                for x, v in enumerate(row):
                    ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6)
            ax.set_title(f"{method} / {task}", fontsize=8)
            ax.set_xlabel("context tokens", fontsize=7)
            ax.set_ylabel("needle depth", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_ablation(ablations: dict, name: str, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ablations[name]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["label"] for r in rows], [r["accuracy"] for r in rows], marker="o", label="prefill")
    if "dense" in ablations:
        ax.axhline(ablations["dense"]["accuracy"], color="gray", linestyle="--", label="dense (vanilla)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (mean over tasks)")
    ax.set_title(f"Prefilling-dLLM: accuracy vs {name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    from pdllm.cli import EMBEDDED_MODEL, load_model

    p = argparse.ArgumentParser(prog="pdllm eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    p.add_argument("--device", default=None)
    p.add_argument("--tasks", default=None, help="comma-separated (synthetic tasks, or benchmark tasks)")
    p.add_argument("--lengths", default="256,512,1024", help="context lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--n", type=int, default=4, help="examples per grid cell")
    p.add_argument("--methods", default="vanilla,dual,prefill")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help="comma-separated, or 'none'")
    p.add_argument("--ablation-n", type=int, default=20, help="examples per task for each ablation setting")
    p.add_argument("--ablation-tasks", default=None, help="tasks for the ablations (default: those the dense "
                   "model answers at all at the longest length: an ablation of a task it cannot do says nothing)")
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_PREFILL["chunk_size"])
    p.add_argument("--top-k", type=int, default=DEFAULT_PREFILL["top_k"])
    p.add_argument("--longbench", type=Path, default=None, help="directory of LongBench <task>.jsonl files")
    p.add_argument("--infinitebench", type=Path, default=None, help="directory of InfiniteBench <task>.jsonl files")
    p.add_argument("--limit", type=int, default=None, help="examples per benchmark task")
    p.add_argument("--max-gen", type=int, default=None, help="cap on a benchmark task's answer length")
    args = p.parse_args(argv)

    model, tok = load_model(args.model, args.device)
    device = str(model.device)
    prefill = dict(chunk_size=args.chunk_size, top_k=args.top_k)
    methods = args.methods.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(args.model), "device": device, "prefill": prefill, "date": time.strftime("%Y-%m-%d")}

    if args.longbench or args.infinitebench:
        from pdllm.eval import load_infinitebench, load_longbench

        tasks = args.tasks.split(",") if args.tasks else None
        examples = (load_longbench(args.longbench, tasks, args.limit) if args.longbench
                    else load_infinitebench(args.infinitebench, tasks, args.limit))
        report["benchmark"] = str(args.longbench or args.infinitebench)
        report["results"] = {m: run_benchmark(model, tok, examples, m, prefill, args.max_gen) for m in methods}
        (args.out / "benchmark.json").write_text(json.dumps(report, indent=2))
        for m, r in report["results"].items():
            print(m, {t: round(v["score"], 4) for t, v in r.items()})
        return 0

    from pdllm.data.synthetic import TASKS

    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    lengths = [int(v) for v in args.lengths.split(",")]
    depths = [float(v) for v in args.depths.split(",")]
    gen = GenerationConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.gen_length,
                           threshold=args.threshold)
    report.update(generation=asdict(gen), tasks=tasks, lengths=lengths, depths=depths, n_per_cell=args.n)
    report["grid"] = run_grid(model, tok, tasks, lengths, depths, args.n, methods, gen, args.batch_size, prefill)
    for method, per_task in report["grid"].items():
        for task, cells in per_task.items():
            accs = [c["accuracy"] for row in cells.values() for c in row.values()]
            longest = cells[str(lengths[-1])]
            print(f"{method:8s} {task:16s} mean {sum(accs) / len(accs):.3f}  at {lengths[-1]} tokens "
                  f"{sum(c['accuracy'] for c in longest.values()) / len(longest):.3f}")
    which = [] if args.ablations == "none" else args.ablations.split(",")
    if which:
        dense = report["grid"].get("vanilla") or report["grid"][methods[0]]
        able = [t for t in tasks if any(c["accuracy"] > 0 for c in dense[t][str(lengths[-1])].values())]
        ablation_tasks = args.ablation_tasks.split(",") if args.ablation_tasks else (able or tasks)
        report["ablation_tasks"] = ablation_tasks
        report["ablations"] = run_ablations(model, tok, ablation_tasks, lengths[-1], args.ablation_n, gen,
                                            args.batch_size, prefill, which)
        print(f"dense (vanilla) on the ablation examples: {report['ablations']['dense']['accuracy']:.3f}")
        for name in which:
            rows = report["ablations"][name]
            print(name, "  ".join(f"{r['label']}: {r['accuracy']:.3f}" for r in rows))
            plot_ablation(report["ablations"], name, args.out / f"ablation_{name}.png")
    (args.out / "eval.json").write_text(json.dumps(report, indent=2))
    plot_heatmaps(report["grid"], args.out / "heatmaps.png")
    print(f"wrote {args.out / 'eval.json'} and plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
