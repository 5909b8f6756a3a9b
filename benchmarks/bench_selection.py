"""What choosing the chunks costs, and what a cheaper choice gives up: early-exit scoring depth,
scoring batched across requests, and chunk K/V encoded once.

``speed`` (a CUDA GPU): LLaDA-8B shape, random bf16 weights (meta device, filled on the GPU), one
request = prefix 32 + context + question 64, answer 32 tokens in one block of 32 with 32 fixed
steps, top-4 x 1024-token chunks. Per context (8K..128K) and scoring depth: scoring time, cache
build, step-0 re-encode, decode, end to end, peak memory, against dual and vanilla timed in the
same run. Vanilla's steps are all the same full forward, so vanilla is timed over a few steps and
scaled to 32 (``scaled_from_steps`` says so); dual past ``--dual-full-max`` is timed the same way
from its refresh step and one cached step. Batches of 1/4/16 requests at 16K give output tokens/s,
beside 4 requests run one after another. Peak memory of a request at the longest contexts (512K)
against the weights' bytes. Ceilings measured in the same run: bf16 matmul rate, copy bandwidth.

``quality`` (CPU is enough): the embedded toy model on its synthetic tasks at 1024 tokens (16
chunks of 64, top-4), every scoring depth and the dense model on the same examples: exact match
and needle-chunk recall@K (is a chunk holding the answer's tokens among the K selected?), with
Wilson 95% intervals.

``plot``: speed vs depth, accuracy / recall vs depth, throughput vs batch, from the two JSONs.

    python benchmarks/bench_selection.py speed --out benchmarks/results/selection_<gpu>.json
    python benchmarks/bench_selection.py quality --out benchmarks/results/selection_quality_toy.json
    python benchmarks/bench_selection.py plot benchmarks/results/selection_<gpu>.json \\
        benchmarks/results/selection_quality_toy.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels through Triton's interpreter (quality, --tiny)
from bench_e2e import make_request  # the request bench_e2e times, so the two benchmarks agree
from ceilings import copy_gbps, matmul_tflops

GEN = dict(gen_length=32, block_length=32, steps=32)


# ---- shared -----------------------------------------------------------------------------------

def write(results: dict, out: str | None):
    if out:  # after every case, so a run cut off by its time limit still leaves its numbers
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


# ---- quality on the toy model -----------------------------------------------------------------

def quality(args) -> dict:
    from pdllm.data.synthetic import make_examples
    from pdllm.environment import environment
    from pdllm.eval.harness import DEFAULT_PREFILL
    from pdllm.eval.metrics import needle_recalled, wilson_interval
    from pdllm.loading import EMBEDDED_MODEL, load_model
    from pdllm.prefill import Prefill, PrefillConfig
    from pdllm.sampler import GenerationConfig, generate

    torch.set_num_threads(args.threads)
    model, tok = load_model(EMBEDDED_MODEL, "cpu")
    L = model.cfg.n_layers
    gen = GenerationConfig(gen_length=16, block_length=16, steps=16, threshold=0.9)  # pdllm eval's defaults
    base = DEFAULT_PREFILL  # pdllm eval's, the toy model's chunk size
    layers = {} if args.score_layers is None else dict(score_layers=args.score_layers)
    depths = args.depths or range(1, L + 1)
    settings = [(f"depth={d}", dict(score_depth=d, **layers)) for d in depths]
    if not args.depths_only:
        settings += [("chunk_query, encoded once", dict(cache_mode="chunk_query")),
                     ("chunk_query, encoded again", dict(cache_mode="chunk_query", encode_once=False))]
    results = {"model": f"embedded toy model (pdllm/assets/toy, {L} layers, max_positions {model.cfg.max_positions})",
               "n_layers": L, "device": "cpu",
               "environment": environment(), "generation": vars(gen),
               "prefill": base, "score_layers": args.score_layers or PrefillConfig().score_layers, "context_tokens": args.length, "tasks": args.tasks, "n_per_task": args.n, "command": args.command,
               "interval": "Wilson 95%", "settings": []}
    examples = [e for t in args.tasks for e in make_examples(t, args.n, args.length, seed="selection", tokenizer=tok.tk)]
    prompts = [tok.long_context_prompt(e.context, e.question) for e in examples]

    def run(method_factory):
        correct, selected, seconds = [], [], 0.0
        for i in range(0, len(prompts), args.batch_size):
            method = method_factory()
            t0 = time.perf_counter()
            out = generate(model, prompts[i : i + args.batch_size], gen, method=method, pad_id=tok.eos_id)
            seconds += time.perf_counter() - t0
            answers = [tok.decode(ids).strip() for ids in out.tokens.tolist()]
            correct += [a == e.answer for a, e in zip(answers, examples[i : i + args.batch_size])]
            kept = getattr(method, "selected", None)
            selected += [None] * len(answers) if kept is None else method.kept_spans
        return correct, selected, seconds

    def summary(label, knobs, correct, selected, seconds):
        row = {"label": label, "prefill": knobs, "seconds": seconds, "correct": [int(c) for c in correct]}
        k = sum(correct)
        row.update(exact_match=k / len(correct), exact_match_interval=wilson_interval(k, len(correct)))
        if selected[0] is not None:  # recall@K: every token of the answer's needle is in a kept chunk
            hits = sum(needle_recalled(e.needle_span, kept) for e, kept in zip(examples, selected))
            row.update(needle_recall=hits / len(examples), needle_recall_interval=wilson_interval(hits, len(examples)))
        per_task = {}
        for t in args.tasks:
            idx = [i for i, e in enumerate(examples) if e.task == t]
            per_task[t] = sum(correct[i] for i in idx) / len(idx)
        row["per_task_exact_match"] = per_task
        results["settings"].append(row)
        print(f"{label:28s} exact match {row['exact_match']:.3f} [{row['exact_match_interval'][0]:.3f}, "
              f"{row['exact_match_interval'][1]:.3f}]  recall@{base['top_k']} {row.get('needle_recall', float('nan')):.3f}"
              f"  {seconds:6.1f}s", flush=True)
        write(results, args.out)

    from pdllm.sampler import Vanilla

    if not args.depths_only:
        summary("dense (vanilla)", None, *run(Vanilla))
    for label, knobs in settings:
        summary(label, knobs, *run(lambda: Prefill(**base, **knobs)))
    full = next(r for r in results["settings"] if r["label"] == f"depth={max(depths)}")
    for row in results["settings"]:  # paired against the deepest setting on the same examples
        a, b = row["correct"], full["correct"]
        row[f"vs_depth={max(depths)}"] = {"better": sum(x > y for x, y in zip(a, b)), "worse": sum(x < y for x, y in zip(a, b))}
    write(results, args.out)
    return results


# ---- speed on the GPU -------------------------------------------------------------------------

def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak():
    gc.collect()  # whatever an earlier run left in reference cycles must not count in this one's peak
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def gpu_ceilings() -> dict:
    """bf16 matmul rate and copy bandwidth of this GPU, measured now as every benchmark measures them."""
    return {"matmul_bf16_tflops": matmul_tflops(), "copy_gbps": copy_gbps()}


def timed(model, requests, method, steps: int = GEN["steps"], **kwargs) -> dict:
    """One batch through one method, timed; peak memory of this call alone."""
    from pdllm.sampler import GenerationConfig, generate

    reset_peak()
    config = GenerationConfig(gen_length=GEN["gen_length"], block_length=GEN["block_length"], steps=steps)
    out = generate(model, requests, config, method=method, **kwargs)
    s = out.stats
    return {"total_s": s["total_s"], "score_s": s.get("score_s", 0.0), "build_s": s.get("build_s", 0.0),
            "reencode_s": s.get("reencode_s", 0.0), "decode_s": s["decode_s"], "nfe": out.nfe,
            "step_ms": 1e3 * s["decode_s"] / out.nfe, "peak_mem_gib": peak_gib(), "batch": len(requests),
            "encode_once": s.get("encode_once"), "output_tokens_per_s": len(requests) * GEN["gen_length"] / s["total_s"]}


def scaled(model, request, method, steps: int) -> dict:
    """A method whose 32 steps cost the same (vanilla) or a refresh and then equal cached steps
    (dual), timed over ``steps`` of them and scaled to 32: the first step (begin included) + 31 x
    the last one (dual's first cached step captures its CUDA graph; the last one replays it)."""
    from pdllm.sampler import GenerationConfig, generate

    stamps = []

    def stamp(event):
        sync()
        stamps.append(time.perf_counter())

    reset_peak()
    config = GenerationConfig(gen_length=GEN["gen_length"], block_length=GEN["block_length"], steps=steps)
    sync()
    t0 = time.perf_counter()
    generate(model, [request], config, method=method, callback=stamp)
    durations = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    total = durations[0] + (GEN["steps"] - 1) * durations[-1]
    return {"total_s": total, "score_s": 0.0, "build_s": 0.0, "reencode_s": 0.0, "decode_s": total,
            "step_ms": 1e3 * total / GEN["steps"], "nfe": GEN["steps"], "scaled_from_steps": steps,
            "first_step_s": durations[0], "step_s": durations[-1], "peak_mem_gib": peak_gib(), "batch": 1,
            "output_tokens_per_s": GEN["gen_length"] / total}


def speed(args) -> dict:
    from pdllm.environment import environment
    from pdllm.model import ModelConfig, build_random

    t_start = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # --tiny: the same sweep on a 4-layer model with LLaDA's vocabulary, to check the script on a CPU
    cfg = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden=128) if args.tiny else ModelConfig()
    model = build_random(cfg, torch.bfloat16 if dev == "cuda" else torch.float32, dev)
    L = cfg.n_layers
    weight_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    prefill_knobs = dict(score="attention", top_k=4, chunk_size=args.chunk_size)
    results = {"environment": environment(), "model": "tiny check" if args.tiny else "LLaDA-8B shape (ModelConfig())",
               "weights": "random (meta init, filled on the device)", "weights_gib": weight_gib,
               "setup": {**GEN, "threshold": None, **prefill_knobs, "prefix_tokens": 32, "question_tokens": 64,
                         "timing": "wall clock with CUDA synchronisation, one run per case after a warm-up of every path",
                         "throughput": "output tokens only", "command": args.command},
               "ceilings": gpu_ceilings() if dev == "cuda" else None, "runs": [], "batched": [], "memory": []}
    print(results["environment"], results["ceilings"], flush=True)

    def prefill(depth, **extra):
        return dict(method="prefill", **prefill_knobs, score_depth=depth, **extra)

    def report(n, name, row):
        row.update(context_tokens=n, method=name)
        for base in ("vanilla", "dual"):  # timed earlier in this run, on the same request
            same = [r for r in results["runs"] if r["context_tokens"] == n and r["method"] == base and "total_s" in r]
            if same:
                row[f"speedup_vs_{base}"] = same[0]["total_s"] / row["total_s"]
        results["runs"].append(row)
        print(f"{time.perf_counter() - t_start:5.0f}s {n:>7} {name:30s} total {row['total_s']:7.3f}s "
              f"score {row['score_s']:6.3f}s reencode {row['reencode_s']:6.3f}s decode {row['decode_s']:6.3f}s "
              f"mem {row['peak_mem_gib']:5.1f}GiB x{row.get('speedup_vs_vanilla', float('nan')):6.1f} vanilla "
              f"x{row.get('speedup_vs_dual', float('nan')):5.2f} dual", flush=True)
        write(results, args.out)

    warm = make_request(4 * args.chunk_size)  # compile / pick kernels on every path once
    for extra in ({}, dict(cache_mode="chunk_query")):
        timed(model, [warm], steps=2, **prefill(None, **extra))
    timed(model, [warm], steps=2, **prefill(args.depths[0]))
    timed(model, [warm], "dual", steps=3)
    timed(model, [warm], "vanilla", steps=2)
    print(f"warm-up done at {time.perf_counter() - t_start:.0f}s", flush=True)

    for n in args.contexts:  # the target contexts first: a run cut off keeps what matters most
        request = make_request(n)
        if n in args.vanilla_contexts:
            report(n, "vanilla", scaled(model, request, "vanilla", 2))
        if n in args.dual_contexts:
            try:
                report(n, "dual", timed(model, [request], "dual") if n <= args.dual_full_max
                       else scaled(model, request, "dual", 3))
            except torch.OutOfMemoryError:
                results["runs"].append({"context_tokens": n, "method": "dual", "error": "out of memory"})
        for d in [None] + args.depths:
            report(n, f"prefill depth={d or L}", timed(model, [request], **prefill(d)))
        if n in args.chunk_query_contexts:
            report(n, f"prefill chunk_query depth={L}", timed(model, [request], **prefill(None, cache_mode="chunk_query")))

    requests = [make_request(args.batch_context - 64 * i, seed=i) for i in range(max(args.batch_sizes))]
    for spec in args.batch_runs:  # "depth:cache_mode", depth 0 = full
        depth, cache_mode = spec.split(":")
        d = int(depth) or None
        knobs = prefill(d, cache_mode=cache_mode)
        tag = dict(context_tokens=args.batch_context, score_depth=d or L, cache_mode=cache_mode)
        for b in args.batch_sizes:
            row = timed(model, requests[:b], **knobs)
            row.update(**tag, one_after_another=False)
            results["batched"].append(row)
            print(f"{time.perf_counter() - t_start:5.0f}s batch {b:>3} depth {d or L} {cache_mode}: "
                  f"{row['output_tokens_per_s']:7.1f} output tok/s total {row['total_s']:.3f}s (score {row['score_s']:.3f} "
                  f"reencode {row['reencode_s']:.3f} decode {row['decode_s']:.3f}) mem {row['peak_mem_gib']:.1f}GiB", flush=True)
            write(results, args.out)
        alone = [timed(model, [r], **knobs)["total_s"] for r in requests[:4]]
        results["batched"].append({**tag, "batch": 4, "one_after_another": True, "total_s": sum(alone),
                                   "output_tokens_per_s": 4 * GEN["gen_length"] / sum(alone)})
        print(f"4 requests one after another: {results['batched'][-1]['output_tokens_per_s']:.1f} output tok/s", flush=True)
        write(results, args.out)

    for n in args.memory_contexts:  # the streamed bound: scoring memory does not grow with the context
        dm = args.memory_depth or None
        try:
            row = timed(model, [make_request(n)], **prefill(dm))
            row.update(context_tokens=n, score_depth=dm or L, over_weights_gib=row["peak_mem_gib"] - weight_gib)
        except torch.OutOfMemoryError:
            row = {"context_tokens": n, "score_depth": dm or L, "error": "out of memory"}
        results["memory"].append(row)
        print(f"{time.perf_counter() - t_start:5.0f}s memory at {n}: {row.get('peak_mem_gib')} GiB, "
              f"weights {weight_gib:.1f} GiB", flush=True)
        write(results, args.out)

    for n in args.extra_contexts:  # the rest of the curve
        request = make_request(n)
        if n in args.vanilla_contexts:
            report(n, "vanilla", scaled(model, request, "vanilla", 2))
        if n in args.dual_contexts:
            report(n, "dual", timed(model, [request], "dual"))
        for dd in [None] + args.depths[:1]:
            report(n, f"prefill depth={dd or L}", timed(model, [request], **prefill(dd)))
    results["wall_s"] = time.perf_counter() - t_start
    write(results, args.out)
    return results


# ---- plots ------------------------------------------------------------------------------------

def plot(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed_json = json.loads(Path(args.speed).read_text())
    quality_jsons = [json.loads(Path(q).read_text()) for q in args.quality]
    out = Path(args.speed).with_suffix("")
    L = 32
    flagged = [(f["context_tokens"], f["method"]) for f in speed_json.get("not_steady_state", []) if "method" in f]
    runs = [r for r in speed_json["runs"] if "total_s" in r and r["method"].startswith("prefill")]
    contexts = sorted({r["context_tokens"] for r in runs})
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for n in contexts:
        rs = sorted((r for r in runs if r["context_tokens"] == n and "chunk_query" not in r["method"]),
                    key=lambda r: int(r["method"].split("=")[1]))
        steady = [r for r in rs if (n, r["method"]) not in flagged]
        depths = [int(r["method"].split("=")[1]) for r in steady]
        (h,) = a.plot(depths, [r["score_s"] for r in steady], "o-", label=f"{n // 1024}K")
        b.plot(depths, [r["speedup_vs_dual"] for r in steady], "o-", color=h.get_color(), label=f"{n // 1024}K")
        for r in rs:
            if (n, r["method"]) in flagged:  # a one-time recompile inside the timing: drawn hollow, not joined
                d = int(r["method"].split("=")[1])
                a.plot([d], [r["score_s"]], "o", mfc="none", color=h.get_color())
                b.plot([d], [r["speedup_vs_dual"]], "o", mfc="none", color=h.get_color())
        for r in runs:
            if r["context_tokens"] == n and "chunk_query" in r["method"]:
                d = int(r["method"].split("=")[1])
                a.plot([d], [r["score_s"]], "x", ms=9, color=h.get_color())
                b.plot([d], [r["speedup_vs_dual"]], "x", ms=9, color=h.get_color())
    a.plot([], [], "kx", label="chunk_query, encoded once")
    a.plot([], [], "ko", mfc="none", label="includes a one-time recompile")
    a.set(xlabel="scoring depth (layers of 32)", ylabel="scoring time (s)", title="scoring time vs depth")
    b.set(xlabel="scoring depth (layers of 32)", ylabel="end-to-end speedup over dual", title="end to end vs dual, same run")
    a.legend(), b.legend()
    env = speed_json["environment"]
    fig.suptitle(f"{env.get('gpu', env.get('device', '?'))}, torch {env['torch']}, LLaDA-8B shape, random bf16", fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{out}_speed_vs_depth.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for qj in quality_jsons:
        rows = [r for r in qj["settings"] if r["label"].startswith("depth=")]
        depths = [int(r["label"].split("=")[1]) for r in rows]
        for key, name, mark in (("exact_match", "exact match", "o-"), ("needle_recall", f"recall@{qj['prefill']['top_k']}", "s--")):
            y = [r[key] for r in rows]
            err = [[v - r[f"{key}_interval"][0] for v, r in zip(y, rows)], [r[f"{key}_interval"][1] - v for v, r in zip(y, rows)]]
            ax.errorbar(depths, y, yerr=err, fmt=mark, capsize=3, label=f"{name}, last {qj['score_layers']} layer(s) read")
    q0 = quality_jsons[0]
    dense = next(r for r in q0["settings"] if r["label"].startswith("dense"))
    ax.axhline(dense["exact_match"], color="gray", ls=":", label="dense exact match (same examples)")
    ax.set(xlabel=f"scoring depth (layers run, of {q0['n_layers']})", ylabel="share of examples", ylim=(0, 1.05),
           xticks=range(1, q0["n_layers"] + 1),
           title=f"toy model, {q0['context_tokens']} tokens, n={len(dense['correct'])}, Wilson 95%")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(args.quality[0]).with_suffix("").as_posix() + "_vs_depth.png", dpi=120)

    if speed_json["batched"]:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for key in dict.fromkeys((r["score_depth"], r["cache_mode"]) for r in speed_json["batched"]):
            rows = [r for r in speed_json["batched"] if (r["score_depth"], r["cache_mode"]) == key]
            bad = [(f["batch"], f["score_depth"], f["cache_mode"]) for f in speed_json.get("not_steady_state", [])
                   if f.get("batched")]
            line = [r for r in rows if not r["one_after_another"]]
            ok = [r for r in line if (r["batch"], *key) not in bad]
            (h,) = ax.plot([r["batch"] for r in ok], [r["output_tokens_per_s"] for r in ok], "o-",
                           label=f"depth {key[0]}, {key[1]}: batched")
            for r in line:
                if (r["batch"], *key) in bad:
                    ax.plot([r["batch"]], [r["output_tokens_per_s"]], "o", mfc="none", color=h.get_color(),
                            label="includes a one-time recompile")
            for r in rows:
                if r["one_after_another"]:
                    ax.plot([r["batch"]], [r["output_tokens_per_s"]], "s", color=h.get_color(),
                            label=f"depth {key[0]}, {key[1]}: 4 one after another")
        ax.set(xscale="log", xlabel="requests per batch", ylabel="output tokens/s",
               title=f"{speed_json['batched'][0]['context_tokens'] // 1024}K-token requests")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{out}_throughput_vs_batch.png", dpi=120)
    print("plots written next to the JSONs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed", help="timings on a CUDA GPU")
    s.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072], help="the target contexts, timed first")
    s.add_argument("--extra-contexts", type=int, nargs="*", default=[8192, 16384], help="timed last")
    s.add_argument("--depths", type=int, nargs="+", default=[8, 16], help="early-exit depths beside full depth")
    s.add_argument("--vanilla-contexts", type=int, nargs="*", default=[8192, 16384, 32768])
    s.add_argument("--dual-contexts", type=int, nargs="*", default=[8192, 16384, 32768, 131072])
    s.add_argument("--dual-full-max", type=int, default=32768, help="longer contexts time dual's steps and scale")
    s.add_argument("--chunk-query-contexts", type=int, nargs="*", default=[32768, 131072])
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    s.add_argument("--batch-context", type=int, default=16384)
    s.add_argument("--batch-runs", nargs="+", default=["0:chunk_query", "8:full_prompt_mask"],
                   help="depth:cache_mode of each batch sweep (depth 0: full)")
    s.add_argument("--memory-contexts", type=int, nargs="*", default=[524288])
    s.add_argument("--memory-depth", type=int, default=8, help="scoring depth at the memory contexts (0: full)")
    s.add_argument("--chunk-size", type=int, default=1024)
    s.add_argument("--tiny", action="store_true", help="a 4-layer model: check the script on a CPU")
    s.add_argument("--out", default=None)
    q = sub.add_parser("quality", help="toy-model accuracy and needle recall against depth (CPU)")
    q.add_argument("--tasks", nargs="+", default=["passkey", "multikey_needle", "kv_lookup"])
    q.add_argument("--n", type=int, default=60, help="examples per task")
    q.add_argument("--length", type=int, default=2048, help="context tokens (the toy model's trained length)")
    q.add_argument("--depths", type=int, nargs="*", default=None, help="scoring depths (default: 1..n_layers)")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--score-layers", type=int, default=None, help="layers read at or below the depth (default: PrefillConfig's)")
    q.add_argument("--depths-only", action="store_true", help="only the depth sweep (no dense, no cache modes)")
    q.add_argument("--out", default=None)
    g = sub.add_parser("plot", help="plots from a speed JSON and a quality JSON")
    g.add_argument("speed")
    g.add_argument("quality", nargs="+", help="quality JSONs (the first has the dense row)")
    args = p.parse_args(argv)
    args.command = " ".join(sys.argv)
    if args.mode == "speed" and not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("error: bench_selection.py speed needs a CUDA GPU (quality runs on a CPU)")
    {"speed": speed, "quality": quality, "plot": plot}[args.mode](args)


if __name__ == "__main__":
    main()
