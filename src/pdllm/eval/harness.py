"""``pdllm eval``: what sparse prefill does to answers, and why an answer is lost.

* the grid: exact match of each method over needle depth x context length (from below to well
  beyond the trained length), per synthetic task, every method on the same examples; for
  ``prefill`` also the scorer's recall@K (are the chunks that hold the needle among the K kept?),
  so that each miss is put down to the selection (needle not kept) or to the model (kept, answered
  wrong);
* a summary: per task and length 95% intervals, paired differences (prefill - dense, BOS anchors
  - none), the depth curve, and the toy model's goals each with its measured figure;
* ablations of Prefilling-dLLM at the trained length: K, chunk size, scoring depth, scoring
  mode, token capacity, cache build mode, position mode, each one knob away from the defaults;
* LongBench / InfiniteBench files from a local directory, scored with their own metrics.

Results are JSON (every setting next to its numbers, per-example outcomes as bit strings) plus
plots: depth x length heatmaps, accuracy and recall@K against length with and without BOS
anchors, the depth curve, the ablations. The prefill methods' knobs are ``pdllm generate``'s flags, one per
PrefillConfig field (--score-depth 2, --no-chunk-bos); a knob left out keeps DEFAULT_PREFILL's value.

    pdllm eval --out runs/eval                      # grid + ablations on the embedded model
    pdllm eval --model DIR --longbench ~/LongBench/data --tasks hotpotqa --limit 50
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from pdllm import distributed
from pdllm.data.synthetic import TASKS, make_examples, make_grid
from pdllm.environment import environment
from pdllm.eval import load_infinitebench, load_longbench
from pdllm.eval.metrics import needle_cut, needle_recalled, paired_difference, wilson_interval
from pdllm.knobs import ArgumentParser, UsageError, add_knob, config_knobs, given_knobs
from pdllm.loading import EMBEDDED_MODEL, load_model
from pdllm.methods import METHODS, make_method
from pdllm.prefill import PrefillConfig
from pdllm.prefill.stages import STEPS
from pdllm.sampler import GenerationConfig, generate

DEFAULT_PREFILL = dict(chunk_size=128, top_k=4, score_batch=64)  # the toy model's chunk size (see its card)
GRID_METHODS = {  # grid label -> (sampler method, knobs over the prefill defaults)
    "prefill_no_bos": ("prefill", dict(chunk_bos=False)),
}
ABLATIONS = {  # name -> list of (label, prefill overrides), each one knob away from the defaults
    "chunk_bos": [("bos", dict(chunk_bos=True)), ("no_bos", dict(chunk_bos=False))],
    "top_k": [(f"k={k}", dict(top_k=k)) for k in (1, 2, 4, 8, 16)],
    # the same 512 tokens of context kept in chunks of each size
    "chunk_size": [(f"chunk={c}", dict(chunk_size=c, top_k=max(1, 512 // c))) for c in (64, 128, 256)],
    # layers the scoring forward runs (it reads the last score_layers of them): the scoring pass's cost
    "score_depth": [(f"depth={d}", dict(score_depth=d, score_layers=min(4, d))) for d in (2, 4, 6)]
    + [("depth=all", dict(score_depth=None))],
    "token_capacity": [(f"cap={c}", dict(token_capacity=c)) for c in (None, 96, 64, 32)],
    "positions": [(p, dict(positions=p)) for p in ("continuous", "reuse", "absolute")],
}


def ablations() -> dict:
    """ABLATIONS, and one per step of the selection pipeline (chunking, score, selection, cache_mode):
    every stage registered for it in turn, so a stage a fork registers is measured with no edit here."""
    steps = {step: [(name, {step: name}) for name in registry] for step, registry in STEPS.items()}
    return {**ABLATIONS, **steps}
DEFAULT_ABLATIONS = ("top_k", "chunk_size", "score_depth", "cache_mode", "positions")


def _bits(flags) -> str:
    return "".join("1" if f else "0" for f in flags)


def _flags(bits: str) -> list[bool]:
    return [c == "1" for c in bits]


def answer_batch(model, tok, prompts, gen: GenerationConfig, method, **kwargs) -> tuple[list[str], float]:
    """Decode a batch; returns the answers (text up to EOS) and the wall time."""
    t0 = time.perf_counter()
    out = generate(model, prompts, gen, method=method, pad_id=tok.eos_id, **kwargs)
    return [tok.decode(ids).strip() for ids in out.tokens.tolist()], time.perf_counter() - t0


def run_examples(model, tok, examples, gen: GenerationConfig, method: str = "vanilla", batch_size: int = 16,
                 **knobs) -> list[dict]:
    """Each synthetic example decoded by one method; per example whether the answer is exactly right and,
    for ``prefill``, which chunks were selected and whether those hold the whole needle (recall@K)."""
    records = []
    for i in distributed.my_share(range(0, len(examples), batch_size)):  # torchrun: this rank's batches
        part = examples[i : i + batch_size]
        prompts = [tok.long_context_prompt(e.context, e.question) for e in part]
        obj = make_method(method, **knobs)
        answers, dt = answer_batch(model, tok, prompts, gen, obj)
        selected = getattr(obj, "selected", None) if method == "prefill" else None
        for j, (e, a) in enumerate(zip(part, answers)):
            rec = {"correct": a == e.answer, "seconds": dt / len(part)}
            if selected is not None:  # the method's own spans: any chunker's boundaries
                rec["needle_selected"] = needle_recalled(e.needle_span, obj.kept_spans[j])
                rec["needle_cut"] = needle_cut(e.needle_span, obj.spans[j])
            records.append(rec)
    return distributed.gather_in_order(records)  # every rank's, in the examples' order


def cell_summary(records: list[dict]) -> dict:
    """Accuracy with its 95% interval, recall@K, and the misses split by whether the needle's chunks were kept:
    a miss with the needle kept is lost by the model, one without it by the selection."""
    n, hits = len(records), sum(r["correct"] for r in records)
    out = {"n": n, "accuracy": hits / max(1, n), "ci95": list(wilson_interval(hits, n)),
           "seconds": sum(r["seconds"] for r in records), "correct": _bits(r["correct"] for r in records)}
    if records and "needle_selected" in records[0]:
        sel = [r["needle_selected"] for r in records]
        out.update(recall=sum(sel) / n, needle_selected=_bits(sel), needle_cut=_bits(r["needle_cut"] for r in records),
                   misses_needle_selected=sum(s and not r["correct"] for s, r in zip(sel, records)),
                   misses_needle_not_selected=sum(not s and not r["correct"] for s, r in zip(sel, records)))
        for part, cut in (("cut", True), ("whole", False)):  # needles a chunk boundary cut, and the rest
            rs = [r for r in records if r["needle_cut"] == cut]
            k = sum(r["correct"] for r in rs)
            out[part] = {"n": len(rs), "accuracy": k / max(1, len(rs)), "ci95": list(wilson_interval(k, len(rs))),
                         "recall": sum(r["needle_selected"] for r in rs) / max(1, len(rs))}
    return out


def synthetic_accuracy(model, tok, examples, gen, method, batch_size, **kwargs) -> dict:
    """Exact-match accuracy (and time, and for prefill recall@K) of one method on synthetic examples."""
    return cell_summary(run_examples(model, tok, examples, gen, method, batch_size, **kwargs))


class Deadline:
    """A time budget: work past it is skipped and listed, so a run on a lent GPU ends with what it has."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.time() + seconds
        self.skipped: list[str] = []

    def passed(self, what: str) -> bool:
        if self.end is not None and distributed.rank0_says(time.time() > self.end):  # the ranks skip alike
            self.skipped.append(what)
            return True
        return False


def _grid_method(label: str, prefill: dict) -> tuple[str, dict]:
    if label in GRID_METHODS:
        method, over = GRID_METHODS[label]
        return method, {**prefill, **over}
    return label, (prefill if label == "prefill" else {})


def run_grid(model, tok, tasks, lengths, depths, n, methods, gen, batch_size, prefill, deadline=None,
             save=None, results: dict | None = None) -> dict:
    """Every method on the same examples of each (task, length, depth) cell, into ``results``
    (``save()`` is called after each task and length, so a cut run keeps what it did)."""
    deadline = deadline or Deadline(None)
    results = {} if results is None else results
    bar = tqdm(total=len(tasks) * len(lengths) * len(depths) * len(methods), desc="grid", unit="cell")
    for L in lengths:
        for task in tasks:
            grid = make_grid(task, [L], depths, n, seed="eval", tokenizer=tok.tk)
            for (_, d), examples in grid.items():
                for label in methods:
                    bar.update(1)
                    if deadline.passed(f"grid {label} {task} {L} {d}"):
                        continue
                    method, kwargs = _grid_method(label, prefill)
                    r = synthetic_accuracy(model, tok, examples, gen, method, batch_size, **kwargs)
                    results.setdefault(label, {}).setdefault(task, {}).setdefault(str(L), {})[str(d)] = r
            if save:
                save()
    bar.close()
    return results


def run_ablations(model, tok, tasks, length, n, gen, batch_size, prefill, which, deadline=None, save=None,
                  results: dict | None = None) -> dict:
    """Each setting of ``which`` on the same examples, and the dense model (``vanilla``) on them
    too (key ``"dense"``), so that every setting reads as a share of dense accuracy."""
    deadline = deadline or Deadline(None)
    examples = {t: make_examples(t, n, length, seed="ablation", tokenizer=tok.tk) for t in tasks}
    dense = {t: synthetic_accuracy(model, tok, ex, gen, "vanilla", batch_size) for t, ex in examples.items()}
    results = {} if results is None else results
    results.update({"length": length, "n_per_task": n,
                    "dense": {"accuracy": sum(r["accuracy"] for r in dense.values()) / len(dense), "tasks": dense}})
    done: dict = {}  # knobs -> per-task results: a setting that is the default runs once
    settings = [(name, label, over) for name in which for label, over in ablations()[name]]
    for name, label, over in tqdm(settings, desc="ablations", unit="setting"):
        kwargs = {**prefill, **over}
        if (over.get("score_depth") or 0) > model.cfg.n_layers:
            results.setdefault("not_run", {})[f"{name} {label}"] = f"the model has {model.cfg.n_layers} layers"
            continue
        key = json.dumps(kwargs, sort_keys=True)
        if key not in done:
            if deadline.passed(f"ablation {name} {label}"):
                continue
            done[key] = {t: synthetic_accuracy(model, tok, ex, gen, "prefill", batch_size, **kwargs)
                         for t, ex in examples.items()}
        per_task = done[key]
        mean = sum(r["accuracy"] for r in per_task.values()) / len(per_task)
        row = {"label": label, "prefill": kwargs, "accuracy": mean, "tasks": per_task}
        if all("recall" in r for r in per_task.values()):
            row["recall"] = sum(r["recall"] for r in per_task.values()) / len(per_task)
        results.setdefault(name, []).append(row)
        if save:
            save()
    return results


# ---------------------------------------------------------------------------------------------
# What the grid says: pooled figures, paired differences, the goals
# ---------------------------------------------------------------------------------------------


def _pool(cells: dict, key: str = "correct") -> list[bool]:
    return [f for c in cells.values() for f in _flags(c.get(key, ""))]


def summarize(report: dict) -> dict:
    """Per task and length, pooled over depths: each method's accuracy (95% Wilson interval), prefill's
    recall@K and where its misses come from, and paired differences on the same examples (prefill - dense,
    BOS anchors - none); per length and depth, pooled over tasks: the depth curve."""
    grid, out = report["grid"], {"by_task_length": {}, "depth_curve": {}}
    dense = "vanilla" if "vanilla" in grid else None
    for task in report["tasks"]:
        for L in map(str, report["lengths"]):
            row: dict = {}
            for label, per_task in grid.items():
                cells = per_task.get(task, {}).get(L)
                if not cells:
                    continue
                flags = _pool(cells)
                m = {"n": len(flags), "accuracy": sum(flags) / len(flags), "ci95": list(wilson_interval(sum(flags), len(flags)))}
                sel = _pool(cells, "needle_selected")
                if sel:
                    m.update(recall=sum(sel) / len(sel), recall_ci95=list(wilson_interval(sum(sel), len(sel))),
                             misses_needle_selected=sum(s and not c for s, c in zip(sel, flags)),
                             misses_needle_not_selected=sum(not s and not c for s, c in zip(sel, flags)))
                    cut = _pool(cells, "needle_cut")
                    whole = [i for i, x in enumerate(cut) if not x]
                    if len(cut) == len(flags) and whole:  # needles a chunk boundary cuts in two, apart
                        m.update(n_needle_cut=len(flags) - len(whole),
                                 accuracy_needle_cut=sum(f for f, x in zip(flags, cut) if x) / max(1, len(flags) - len(whole)),
                                 accuracy_needle_whole=sum(flags[i] for i in whole) / len(whole),
                                 recall_needle_whole=sum(sel[i] for i in whole) / len(whole))
                row[label] = m
                row[f"_{label}_flags"] = flags
            if dense in row and "prefill" in row and len(row["_prefill_flags"]) == len(row[f"_{dense}_flags"]):
                row["prefill_minus_dense"] = list(paired_difference(row["_prefill_flags"], row[f"_{dense}_flags"]))
            if "prefill" in row and "prefill_no_bos" in row and len(row["_prefill_flags"]) == len(row["_prefill_no_bos_flags"]):
                row["bos_minus_no_bos"] = list(paired_difference(row["_prefill_flags"], row["_prefill_no_bos_flags"]))
                cut = _pool(grid["prefill"][task][L], "needle_cut")
                whole = [i for i, x in enumerate(cut) if not x]
                if len(cut) == len(row["_prefill_flags"]) and whole:  # a BOS inside a cut needle is another matter
                    row["bos_minus_no_bos_needle_whole"] = list(paired_difference(
                        [row["_prefill_flags"][i] for i in whole], [row["_prefill_no_bos_flags"][i] for i in whole]))
            out["by_task_length"].setdefault(task, {})[L] = {k: v for k, v in row.items() if not k.startswith("_")}
    for label, per_task in grid.items():
        for L in map(str, report["lengths"]):
            for d in map(str, report["depths"]):
                cells = [per_task[task].get(L, {}).get(d, {}) for task in per_task]
                flags = [f for c in cells for f in _flags(c.get("correct", ""))]
                if not flags:
                    continue
                point = {"n": len(flags), "accuracy": sum(flags) / len(flags),
                         "ci95": list(wilson_interval(sum(flags), len(flags)))}
                cut = [x for c in cells for x in _flags(c.get("needle_cut", ""))]
                if len(cut) == len(flags):  # the same curve over the needles no chunk boundary cuts
                    whole = [f for f, x in zip(flags, cut) if not x]
                    point.update(n_needle_cut=len(flags) - len(whole))
                    if whole:
                        point.update(accuracy_needle_whole=sum(whole) / len(whole),
                                     ci95_needle_whole=list(wilson_interval(sum(whole), len(whole))))
                out["depth_curve"].setdefault(label, {}).setdefault(L, {})[d] = point
    return out


def check_goals(report: dict) -> list[dict]:
    """Issue 18's goals, each with the figure measured and, where one is missed, which part loses it."""
    s, trained = report["summary"]["by_task_length"], str(report["trained_length"])
    goals = []

    def add(goal, value, met, why=""):
        goals.append({"goal": goal, "measured": value, "met": bool(met), **({"where_lost": why} if why and not met else {})})

    for task, by_len in s.items():
        row = by_len.get(trained, {})
        if "vanilla" in row:
            add(f"dense >= 0.95 at the trained length ({task})", round(row["vanilla"]["accuracy"], 3),
                row["vanilla"]["accuracy"] >= 0.95, "the model")
        if "vanilla" in row and "prefill" in row:
            p, d = row["prefill"], row["vanilla"]["accuracy"]
            lost = ("selection" if p["misses_needle_not_selected"] >= p["misses_needle_selected"] else "the model")
            add(f"prefill >= 0.99 x dense at the trained length ({task})", f"{p['accuracy']:.3f} vs {d:.3f}",
                p["accuracy"] >= 0.99 * d, f"{lost} ({p['misses_needle_not_selected']} misses without the needle's chunks, "
                f"{p['misses_needle_selected']} with them){_cut_note(p)}")
            add(f"recall@K >= 0.98 at the trained length ({task})", round(p["recall"], 3), p["recall"] >= 0.98,
                f"selection{_cut_note(p)}")
        for L, r in by_len.items():
            if int(L) >= 2 * int(trained) and "prefill_minus_dense" in r:
                p = r["prefill"]
                lost = ("selection" if p["misses_needle_not_selected"] >= p["misses_needle_selected"] else "the model")
                add(f"prefill >= dense + 0.2 at {int(L) / int(trained):g}x ({task})",
                    f"{p['accuracy']:.3f} vs {r['vanilla']['accuracy']:.3f}", r["prefill_minus_dense"][0] >= 0.2, lost)
            if "bos_minus_no_bos" in r:
                diff, lo, hi = r["bos_minus_no_bos"]
                why = "the model (anchors hurt it)"
                if "bos_minus_no_bos_needle_whole" in r:
                    w = r["bos_minus_no_bos_needle_whole"]
                    why += (f"; over the needles no chunk boundary cuts: {w[0]:+.3f} [{w[1]:+.3f}, {w[2]:+.3f}] (an anchor "
                            "inside a cut needle separates its key from its value)")
                add(f"BOS anchors >= no anchors at {L} ({task})", f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]", hi >= 0, why)
    curve = report["summary"]["depth_curve"].get("prefill", {})
    for L, by_depth in curve.items():
        accs = [c["accuracy"] for c in by_depth.values()]
        flat = max(c["ci95"][0] for c in by_depth.values()) <= min(c["ci95"][1] for c in by_depth.values())
        why = "the selection at some depths"
        points = list(by_depth.values())
        if all("ci95_needle_whole" in c for c in points) and any(c["n_needle_cut"] for c in points):
            whole = [c["accuracy_needle_whole"] for c in points]
            flat_whole = max(c["ci95_needle_whole"][0] for c in points) <= min(c["ci95_needle_whole"][1] for c in points)
            cut = ", ".join(f"{d}: {c['n_needle_cut']}/{c['n']}" for d, c in by_depth.items() if c["n_needle_cut"])
            why = (f"chunk boundaries: the needle is cut in two by a chunk boundary at depth {cut}; over the needles "
                   f"no boundary cuts the curve is {min(whole):.3f}-{max(whole):.3f}, "
                   f"{'flat' if flat_whole else 'not flat'} within the noise")
        add(f"prefill depth curve flat within the noise at {L}", f"{min(accs):.3f}-{max(accs):.3f}", flat, why)
    return goals


def _cut_note(p: dict) -> str:
    if not p.get("n_needle_cut"):
        return ""
    return (f"; {p['n_needle_cut']} of {p['n']} needles are cut in two by a chunk boundary (accuracy "
            f"{p['accuracy_needle_cut']:.3f}); the others: accuracy {p['accuracy_needle_whole']:.3f}, "
            f"recall {p['recall_needle_whole']:.3f}")


def run_benchmark(model, tok, examples, method, prefill, max_gen: int | None) -> dict:
    """LongBench/InfiniteBench examples one at a time (their answers have different lengths)."""
    scored = []
    for ex in tqdm(distributed.my_share(examples), desc=f"{method}", unit="example"):  # torchrun: this rank's
        gen_len = min(ex.max_new_tokens, max_gen or ex.max_new_tokens)
        gen = GenerationConfig(gen_length=gen_len, block_length=gen_len, steps=gen_len, threshold=0.9)
        prompt = tok.long_context_prompt(ex.context, ex.question, instruction=ex.prefix, question_template="{question}")
        name, knobs = _grid_method(method, prefill)  # a label such as prefill_no_bos is prefill with its knobs
        (answer,), _ = answer_batch(model, tok, [prompt], gen, name, **knobs)
        scored.append([ex.task, ex.score(answer)])
    per_task: dict[str, list[float]] = {}
    for task, score in distributed.gather_in_order(scored):
        per_task.setdefault(task, []).append(score)
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
            lengths = sorted(cells, key=int)
            depths = sorted(cells[lengths[0]], key=float)
            acc = [[cells[L].get(d, {}).get("accuracy", float("nan")) for L in lengths] for d in depths]
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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, xs, cells, **kw):
    acc = [c["accuracy"] for c in cells]
    err = [[max(0.0, a - c["ci95"][0]) for a, c in zip(acc, cells)], [max(0.0, c["ci95"][1] - a) for a, c in zip(acc, cells)]]
    ax.errorbar(xs, acc, yerr=err, marker="o", capsize=3, **kw)


def plot_lengths(report: dict, out: Path):
    """Accuracy against context length, pooled over tasks and depths (95% intervals): dense, prefill with BOS
    anchors and without; and prefill's recall@K of the needle's chunk beside it."""
    plt = _plt()
    grid, lengths = report["grid"], [str(L) for L in report["lengths"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    lines = [("vanilla", "k--", False), ("prefill", "C0-", False), ("prefill_no_bos", "C1-", False), ("dual", "C2-", False),
             ("prefill", "C0:", True)]  # the last: only the needles that no chunk boundary cuts in two
    for label, style, whole_only in lines:
        if label not in grid:
            continue
        for key, axis in (("correct", ax), ("needle_selected", bx)):
            cells, xs = [], []
            for L in lengths:
                row = [c for t in grid[label] for c in grid[label][t].get(L, {}).values()]
                flags, cut = _flags("".join(c.get(key, "") for c in row)), _flags("".join(c.get("needle_cut", "") for c in row))
                if whole_only:
                    flags = [f for f, x in zip(flags, cut) if not x] if len(cut) == len(flags) else []
                if flags:
                    cells.append({"accuracy": sum(flags) / len(flags), "ci95": wilson_interval(sum(flags), len(flags))})
                    xs.append(int(L))
            if cells:
                _errorbar(axis, xs, cells, fmt=style, label=label + (", needle not cut by a chunk boundary" if whole_only else ""))
    for axis, title in ((ax, "exact match"), (bx, f"recall@K of the needle's chunk (top-{report['prefill']['top_k']})")):
        axis.axvline(report["trained_length"], color="gray", alpha=0.4)
        axis.set_xscale("log", base=2)
        axis.set_xticks([int(L) for L in lengths], lengths)
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("context tokens (grey: trained length)")
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_depth_curve(report: dict, out: Path):
    """Accuracy against needle depth at each length, pooled over tasks (95% intervals)."""
    plt = _plt()
    curve = report["summary"]["depth_curve"]
    lengths = [str(L) for L in report["lengths"]]
    fig, axes = plt.subplots(1, len(lengths), figsize=(3 * len(lengths), 3), squeeze=False, sharey=True)
    for ax, L in zip(axes[0], lengths):
        for label, style in (("vanilla", "k--"), ("prefill", "C0-"), ("prefill_no_bos", "C1-")):
            cells = curve.get(label, {}).get(L)
            if cells:
                _errorbar(ax, [float(d) for d in cells], list(cells.values()), fmt=style, label=label)
            if label == "prefill" and cells and all("ci95_needle_whole" in c for c in cells.values()):
                whole = [{"accuracy": c["accuracy_needle_whole"], "ci95": c["ci95_needle_whole"]} for c in cells.values()]
                _errorbar(ax, [float(d) for d in cells], whole, fmt="C0:", label="prefill, needle not cut by a chunk boundary")
        ax.set_title(f"{L} tokens", fontsize=9)
        ax.set_xlabel("needle depth")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact match")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_ablations(ablations: dict, out: Path):
    """One panel per ablation: prefill's accuracy and recall@K per setting, dense on the same examples."""
    plt = _plt()
    names = [k for k, v in ablations.items() if isinstance(v, list)]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        rows = ablations[name]
        ax.plot([r["label"] for r in rows], [r["accuracy"] for r in rows], marker="o", label="prefill")
        if all("recall" in r for r in rows):
            ax.plot([r["label"] for r in rows], [r["recall"] for r in rows], marker="s", linestyle=":", label="recall@K")
        ax.axhline(ablations["dense"]["accuracy"], color="gray", linestyle="--", label="dense")
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean over tasks at {ablations.get('length', '?')} tokens")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_report(report: dict, out_dir: Path):
    """Every plot of a synthetic report (also from a committed eval JSON)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_heatmaps(report["grid"], out_dir / "heatmaps.png")
    plot_lengths(report, out_dir / "lengths_recall_bos.png")
    plot_depth_curve(report, out_dir / "depth_curve.png")
    if "ablations" in report:
        plot_ablations(report["ablations"], out_dir / "ablations.png")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _list(text: str, flag: str, kind=str, allowed=None) -> list:

    items = [v.strip() for v in text.split(",") if v.strip()]
    try:
        values = [kind(v) for v in items]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated {kind.__name__} values") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    bad = [v for v in values if allowed is not None and v not in allowed]
    if bad:
        raise UsageError(f"{flag}: unknown {', '.join(map(str, bad))}; choose from {', '.join(map(str, allowed))}")
    return values


def eval_prefill_knobs() -> list:
    """The prefill flags of ``pdllm eval``: one per PrefillConfig field, derived as ``pdllm generate``
    derives them (pdllm.cli.config_knobs), except chunk_parallel: the eval already spreads its
    examples across torchrun's ranks, and chunk-parallel scoring needs every rank on one request."""
    return [k for k in config_knobs(PrefillConfig) if k.name != "chunk_parallel"]


def prefill_knobs(args) -> dict:
    """The prefill knobs of a run: DEFAULT_PREFILL, and the flags given on top."""
    return {**DEFAULT_PREFILL, **given_knobs(args, eval_prefill_knobs())}


def check_args(args):
    """The eval command's flags, checked before anything is loaded or written: (methods, benchmark
    examples or None, the synthetic grid's parsed lists or None): main runs what was checked."""
    methods = _list(args.methods, "--methods", allowed=(*METHODS, *GRID_METHODS))
    for flag, value in (("--n", args.n), ("--ablation-n", args.ablation_n), ("--gen-length", args.gen_length),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be >= 1")
    PrefillConfig(**prefill_knobs(args))  # a bad knob is PrefillConfig's one-line ValueError, before the model loads
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a file; give a directory for the results")
    bench = args.longbench or args.infinitebench
    if args.longbench and args.infinitebench:
        raise UsageError("give --longbench DIR or --infinitebench DIR, not both (run them one after the other)")
    if bench is None:
        for flag, value in (("--limit", args.limit), ("--max-gen", args.max_gen)):
            if value is not None:
                raise UsageError(f"{flag} applies to --longbench/--infinitebench runs (the synthetic grid's size is --n)")
        grid = {"tasks": _list(args.tasks, "--tasks", allowed=tuple(TASKS)) if args.tasks else list(TASKS),
                "lengths": _list(args.lengths, "--lengths", int), "depths": _list(args.depths, "--depths", float),
                "ablations": [] if args.ablations == "none" else _list(args.ablations, "--ablations",
                                                                       allowed=tuple(ablations())),
                "ablation_tasks": _list(args.ablation_tasks, "--ablation-tasks", allowed=tuple(TASKS))
                if args.ablation_tasks else None}
        if not all(0 <= d <= 1 for d in grid["depths"]):
            raise UsageError(f"--depths {args.depths}: depths are fractions of the context, in [0, 1]")
        return methods, None, grid
    flag = "--longbench" if args.longbench else "--infinitebench"
    if not bench.exists():
        raise UsageError(f"{flag} {bench}: no such directory (it should hold the benchmark's <task>.jsonl files)")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: give at least 1 example per task (leave --limit out for all)")
    if args.max_gen is not None and args.max_gen < 1:
        raise UsageError(f"--max-gen {args.max_gen}: must be >= 1")

    tasks = _list(args.tasks, "--tasks") if args.tasks else None
    load = load_longbench if args.longbench else load_infinitebench
    return methods, load(bench, tasks, args.limit), None


def main(argv=None) -> int:

    p = ArgumentParser(prog="pdllm eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    p.add_argument("--device", default=None)
    p.add_argument("--tasks", default=None, help="comma-separated (synthetic tasks, or benchmark tasks)")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths in tokens")
    p.add_argument("--trained-length", type=int, default=None, help="the context length the model was trained "
                   "at (default: the longest of --lengths within the model's max_positions)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--n", type=int, default=4, help="examples per grid cell")
    p.add_argument("--methods", default="vanilla,prefill,prefill_no_bos",
                   help=f"sampler methods, or {', '.join(GRID_METHODS)} (prefill with one knob changed)")
    p.add_argument("--ablations", default=",".join(DEFAULT_ABLATIONS), help=f"comma-separated of {', '.join(ablations())}, or 'none'")
    p.add_argument("--ablation-n", type=int, default=20, help="examples per task for each ablation setting")
    p.add_argument("--ablation-length", type=int, default=None, help="context length of the ablations "
                   "(default: the trained length)")
    p.add_argument("--ablation-tasks", default=None, help="tasks for the ablations (default: those the dense "
                   "model answers at all at the ablation length: an ablation of a task it cannot do says nothing)")
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the grid: cells past it are skipped "
                   "and listed in the report")
    p.add_argument("--ablation-time-budget", type=float, default=None, help="seconds for the ablations, likewise")
    p.add_argument("--longbench", type=Path, default=None, help="directory of LongBench <task>.jsonl files")
    p.add_argument("--infinitebench", type=Path, default=None, help="directory of InfiniteBench <task>.jsonl files")
    p.add_argument("--limit", type=int, default=None, help="examples per benchmark task")
    p.add_argument("--max-gen", type=int, default=None, help="cap on a benchmark task's answer length")
    g = p.add_argument_group("prefill (PrefillConfig, for the prefill methods; each ablation changes one knob)",
                             "no --chunk-parallel: under torchrun the eval spreads its examples across the ranks")
    for knob in eval_prefill_knobs():
        add_knob(g, knob, DEFAULT_PREFILL.get(knob.name))
    args = p.parse_args(argv)
    methods, examples, grid = check_args(args)  # every flag and path, before the model loads or --out is made

    if distributed.init():  # under torchrun: each rank takes its share of the examples (pdllm.distributed)
        distributed.quiet_other_ranks()
    model, tok = load_model(args.model, args.device)
    device = str(model.device)
    prefill = prefill_knobs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model.name, "device": torch.cuda.get_device_name(model.device) if device.startswith("cuda")
              else "cpu", "environment": environment(), "prefill": prefill,
              "command": "pdllm eval " + " ".join(argv if argv is not None else sys.argv[1:])}

    if examples is not None:
        report["benchmark"] = str(args.longbench or args.infinitebench)
        report["results"] = {m: run_benchmark(model, tok, examples, m, prefill, args.max_gen) for m in methods}
        if distributed.is_main():
            (args.out / "benchmark.json").write_text(json.dumps(report, indent=2))
        for m, r in report["results"].items():
            print(m, {t: round(v["score"], 4) for t, v in r.items()})
        return 0

    tasks, lengths, depths = grid["tasks"], grid["lengths"], grid["depths"]
    within = [L for L in lengths if L <= model.cfg.max_positions]
    trained = args.trained_length or (max(within) if within else lengths[0])
    gen = GenerationConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.gen_length,
                           threshold=args.threshold)
    report.update(generation=asdict(gen), tasks=tasks, lengths=lengths, trained_length=trained, depths=depths,
                  n_per_cell=args.n, model_max_positions=model.cfg.max_positions)
    deadline, ablation_deadline = Deadline(args.time_budget), Deadline(None)

    def save():
        report["skipped_for_time"] = deadline.skipped + ablation_deadline.skipped
        if distributed.is_main():  # torchrun: every rank holds the gathered report, rank 0 writes it
            (args.out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")

    first = sorted(lengths, key=lambda L: (L < trained, L))  # the trained length and beyond first, if time runs out
    report["grid"] = {}
    run_grid(model, tok, tasks, first, depths, args.n, methods, gen, args.batch_size, prefill, deadline, save,
             report["grid"])
    which = grid["ablations"]
    if which:
        ablation_deadline = Deadline(args.ablation_time_budget)
        length = args.ablation_length or trained
        dense = report["grid"].get("vanilla", {})
        able = [t for t in tasks if any(c["accuracy"] > 0 for c in dense.get(t, {}).get(str(length), {}).values())]
        ablation_tasks = grid["ablation_tasks"] or able or tasks
        report["ablation_tasks"] = ablation_tasks
        report["ablations"] = {}
        run_ablations(model, tok, ablation_tasks, length, args.ablation_n, gen, args.batch_size, prefill, which,
                      ablation_deadline, save, report["ablations"])
    report["summary"] = summarize(report)
    report["goals"] = check_goals(report)
    save()
    for task, by_len in report["summary"]["by_task_length"].items():
        for L, row in by_len.items():
            print(f"{task:16s} {L:>6s}  " + "  ".join(f"{m} {v['accuracy']:.3f}" + (f" (recall {v['recall']:.3f})"
                  if "recall" in v else "") for m, v in row.items() if isinstance(v, dict)))
    for name in which:
        for r in report["ablations"].get(name, []):
            print(f"ablation {name:12s} {r['label']:18s} {r['accuracy']:.3f}" + (f" recall {r['recall']:.3f}" if "recall" in r else ""))
    for g in report["goals"]:
        print(("MET   " if g["met"] else "MISSED"), g["goal"], g["measured"], g.get("where_lost", ""))
    if distributed.is_main():
        plot_report(report, args.out)
    print(f"wrote {args.out / 'eval.json'} and plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
