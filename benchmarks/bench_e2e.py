"""End-to-end latency of one long-context request, every method side by side on one GPU.

LLaDA-8B-shaped model with random bf16 weights (built on the meta device, filled on the GPU: no
download), one request = prefix + context (8K..128K tokens) + question (~64 tokens), answer of 32
tokens in one block of 32 with 32 fixed steps (threshold off, so every method does the same
number of denoising steps). Methods: vanilla (whole sequence every step), dual (Fast-dLLM dual
cache), Prefilling-dLLM (top-4 of 1024-token chunks) with fixed chunks (prefill-attention),
snapped chunks, FP8 scoring and cascaded FP8 scoring (their ``topk_agreement`` with full-depth
selection, measured on the toy model, is in each record), prefill-draft, dllm_cache and dyllm
(their recomputed fraction is reported: their cost follows it).

Reported per (context, method): end-to-end latency and its split (scoring, cache build, decode
steps), the decode loop's steps split too (CUDA events, no host sync: step 0 = the refresh that
re-encodes what the block attends to, step 1 = the CUDA-graph capture, the median of the others =
the steady step, and the sampler's own work per step), peak GPU memory, and speedups over vanilla
and dual *measured in the same run*. Throughput is output tokens only; NFE = number of model
forwards of the decode loop.

Beside them, measured in the same run (``floors``): the copy rate and matmul rate of the GPU; the
GEMM-only time of a decode step (the model's linear layers for 32 rows, one CUDA graph) and the
time to read its weights once at the copy rate; the scoring forward (8 chunks x 1153 tokens) and
its GEMM-only time, as TFLOP/s on the linear layers; and a synthetic decode step (32 rows over
4228 cached rows, the 32K request's selection) eager and from a CUDA graph, for each block backend
(eager, compiled): every figure has its floor beside it. Vanilla and dual run the same model (the
``--block-backend`` given), so the ratios are against the best baselines.

    python benchmarks/bench_e2e.py --out benchmarks/results/e2e_<device>.json
    pytest --benchmark benchmarks/bench_e2e.py     # the 8K case through pytest-benchmark
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pdllm import fp8
from pdllm.environment import environment
from pdllm.model import BLOCK_BACKENDS, ModelConfig, build_random

sys.path.insert(0, str(Path(__file__).parent))
from ceilings import copy_gbps, gemm_floor, graph_time_ms, matmul_tflops  # noqa: E402

LLADA_8B = ModelConfig()  # ModelConfig's defaults are LLaDA-8B's shape and special tokens
PREFILL = dict(top_k=4, chunk_size=1024)
# Cascade schedules as (fraction of the depth, fraction kept): the 8B model's exit layers and the toy
# model's (topk_agreement) are the same fractions of their depths.
QUARTERS = ((0.25, 0.5), (0.5, 0.5), (0.75, 0.5))
METHODS = {
    "vanilla": ("vanilla", {}),
    "dual": ("dual", {}),
    "prefill-attention": ("prefill", dict(score="attention", chunking="bos_added", **PREFILL)),  # fixed chunks
    "prefill-snapped": ("prefill", dict(score="attention", chunking="snapped", **PREFILL)),  # structure-aware
    "prefill-fp8": ("prefill", dict(score="attention", score_fp8=True, **PREFILL)),
    "prefill-cascade-fp8": ("prefill", dict(score="cascade", cascade=((0.75, 0.5),), score_fp8=True, **PREFILL)),
    "prefill-quarters-fp8": ("prefill", dict(score="cascade", cascade=QUARTERS, score_fp8=True, **PREFILL)),
    "prefill-draft": ("prefill", dict(score="draft", top_k=4, chunk_size=1024)),
    "dllm_cache": ("dllm_cache", {}),  # K_p=100, K_r=8, rho=0.25: cost follows the recomputed fraction
    "dyllm": ("dyllm", {}),  # num_full_steps=4, tau=0.99
}


def make_request(context_tokens: int, question_tokens: int = 64, prefix_tokens: int = 32, seed: int = 0):
    """Random token ids, with the breaks of prose (a sentence end every 8-30 tokens, a paragraph every
    few hundred) for structure-aware chunking to snap to."""
    from pdllm.boundaries import PARAGRAPH, SENTENCE
    from pdllm.tokenizer import LongContextPrompt

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1000, 100000, (n,), generator=g).tolist()  # noqa: E731
    ends = torch.randint(8, 31, (context_tokens // 8 + 1,), generator=g).cumsum(0)
    breaks = torch.zeros(context_tokens, dtype=torch.int8)
    breaks[ends[ends < context_tokens]] = SENTENCE
    breaks[ends[ends < context_tokens][::12]] = PARAGRAPH
    return LongContextPrompt(prefix=[LLADA_8B.bos_id] + ids(prefix_tokens - 1), context=ids(context_tokens),
                             query=ids(question_tokens), breaks=breaks.tolist())


def knobs_for(kwargs: dict, n_layers: int) -> dict:
    """A method's knobs for a model of n_layers: a cascade given as depth fractions becomes exit layers."""
    if isinstance(kwargs.get("cascade"), tuple):
        exits = ",".join(f"{max(1, round(f * n_layers))}:{keep}" for f, keep in kwargs["cascade"])
        return {**kwargs, "cascade": exits}
    return kwargs


def run_one(model, request, method: str, steps: int = 32, extrapolate: bool = False) -> dict:
    """One request (or a list of requests: one batch) through one method, timed. ``extrapolate``: run
    4 of the 32 steps and count the other steady steps at the median of those measured (every step
    after the first two is the same forward), for methods whose 32 steps take tens of seconds."""
    from pdllm.sampler import GenerationConfig, generate

    name, kwargs = METHODS[method]
    kwargs = knobs_for(kwargs, model.cfg.n_layers)
    timed_steps = 4 if extrapolate else steps
    config = GenerationConfig(gen_length=32, block_length=32, steps=timed_steps)
    gc.collect()  # whatever an earlier run left in reference cycles must not count in this one's peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    batch = request if isinstance(request, list) else [request]
    out = generate(model, batch, config, method=name, time_steps=True, **kwargs)
    s = out.stats
    row = {"method": method, "total_s": s["total_s"], "score_s": s.get("score_s", 0.0),
           "build_s": s.get("build_s", s["begin_s"]), "decode_s": s["decode_s"], "nfe": out.nfe,
           "step_ms": 1e3 * s["decode_s"] / out.nfe, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
           "batch": len(batch), "output_tokens_per_s": len(batch) * config.gen_length / s["total_s"],
           "block_backend": model.block_backend}
    model_ms, sampler_ms = s["model_ms"], s["sampler_ms"]
    row.update(refresh_step_ms=model_ms[0], capture_step_ms=model_ms[1] if len(model_ms) > 1 else None,
               steady_step_ms=statistics.median(model_ms[2:]) if len(model_ms) > 2 else None,
               sampler_ms_per_step=statistics.median(sampler_ms))
    if extrapolate:  # the 28 steady steps not run, at the median of the two that were
        more = (steps - timed_steps) * (row["steady_step_ms"] + row["sampler_ms_per_step"]) / 1e3
        row.update(total_s=row["total_s"] + more, decode_s=row["decode_s"] + more, nfe=steps,
                   extrapolated_from_steps=timed_steps)
        row["step_ms"] = 1e3 * row["decode_s"] / steps
        row["output_tokens_per_s"] = len(batch) * config.gen_length / row["total_s"]
    if name == "prefill":
        row.update(selected=s["selected"][0], n_chunks=s["chunks"][0], kv_rows=s["kv_rows"][0])
    if "recomputed_fraction" in s:  # dLLM-Cache / DyLLM: their cost depends on it
        row["recomputed_fraction"] = s["recomputed_fraction"]
    return row


# ---- the quality of a fast setting: its selection against full-depth selection, on the toy model ---

AGREEMENT_REQUESTS, AGREEMENT_LENGTH = 210, 2048  # 70 per task at the toy model's trained length


def topk_agreement(kwargs: dict, cache: dict) -> float:
    """Top-K agreement of a prefill setting's selection with full-depth selection in the model's
    precision (bf16 on a GPU), same chunking, on the embedded toy model (its 128-token chunks, top-4,
    synthetic needle questions at random depths): what a speed figure of this setting costs in
    selection quality. ``cache`` keeps the toy model, the requests and the references between calls."""
    from pdllm.calibrate import TASKS, agreement, select
    from pdllm.data.synthetic import make_examples
    from pdllm.loading import EMBEDDED_MODEL, load_model
    from pdllm.prefill import Chunked, PrefillConfig

    if "model" not in cache:
        cache["model"], cache["tok"] = load_model(EMBEDDED_MODEL, "cuda")
        tok, per_task = cache["tok"], AGREEMENT_REQUESTS // len(TASKS)
        examples = [e for t in TASKS for e in make_examples(t, per_task, AGREEMENT_LENGTH, seed="agreement",
                                                              tokenizer=tok.tk)]
        cache["prompts"] = [tok.long_context_prompt(e.context, e.question) for e in examples]
    model = cache["model"]
    knobs = {**knobs_for(kwargs, model.cfg.n_layers), "chunk_size": 128, "score_batch": 64}
    reference_knobs = {k: v for k, v in knobs.items() if k not in ("score", "cascade", "score_fp8", "score_depth")}
    key = json.dumps(reference_knobs, sort_keys=True)
    ref_cfg = PrefillConfig(**reference_knobs)
    bos = model.cfg.bos_id
    requests = [Chunked.of(p, ref_cfg.stage("chunking")(p, bos), bos) for p in cache["prompts"]]
    if key not in cache:
        cache[key] = select(model, ref_cfg, requests, 32)[0]
    cfg = PrefillConfig(**knobs)
    select(model, cfg, requests[:2], 32)  # warm-up
    return agreement(cache[key], select(model, cfg, requests, 32)[0])


# ---- the floors: what the GPU and the model's matrix work allow, measured in the same run -------

SCORING_BATCH, SCORING_TOKENS = 8, 32 + 1025 + 64 + 32  # chunks per forward; prefix + BOS-chunk + query + slots
DECODE_ROWS, DECODE_KV_ROWS = 32, 32 + 4 * 1025 + 64 + 32  # the block; the 32K request's selected rows


def event_time_ms(fn, repeats: int = 5) -> float:
    """Median of eager calls, each timed by CUDA events (host launch path included)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def synthetic_decode_step(model):
    """fn() = one decode step: 32 rows against a chunk KV pool of the 32K request's size (random K/V)."""
    from pdllm.cache import ChunkKVCache

    cache = ChunkKVCache.for_model(model, DECODE_KV_ROWS)
    rows = cache.allocate(DECODE_KV_ROWS)
    cache.k.normal_()
    cache.v.normal_()
    cache.set_index([rows])
    cache.set_write_rows(rows[-DECODE_ROWS:][None])
    idx = torch.randint(1000, 100000, (1, DECODE_ROWS), device="cuda")
    pos = torch.arange(DECODE_KV_ROWS - DECODE_ROWS, DECODE_KV_ROWS, device="cuda")[None]
    return lambda: model(idx, pos, cache=cache, logits_slice=slice(0, DECODE_ROWS))


@torch.no_grad()
def floors(model, backends=("eager", "compiled")) -> dict:
    """Ceilings of the GPU, GEMM-only and weight-read floors of the model, and the decode step and
    scoring forward of each block backend measured against them."""
    copy = copy_gbps()  # one copy rate for every floor of the run
    out = {"copy_gbps": copy, "matmul_bf16_tflops": matmul_tflops(),
           "decode_gemm": gemm_floor(model, DECODE_ROWS, copy=copy),
           "scoring_gemm": gemm_floor(model, SCORING_BATCH * SCORING_TOKENS, with_head=False, copy=copy)}
    idx = torch.randint(1000, 100000, (SCORING_BATCH, SCORING_TOKENS), device="cuda")
    pos = torch.arange(SCORING_TOKENS, device="cuda").expand_as(idx)
    saved = model.block_backend
    for backend in backends:
        model.block_backend = backend
        step = synthetic_decode_step(model)
        scoring_ms = event_time_ms(lambda: model(idx, pos, logits_slice=slice(0, 0)))
        out[backend] = {"decode_step_eager_ms": event_time_ms(step, repeats=10),
                        "decode_step_graph_ms": graph_time_ms(step),
                        "scoring_forward_ms": scoring_ms,
                        "scoring_linear_tflops": out["scoring_gemm"]["linear_flops"] / (scoring_ms * 1e-3) / 1e12}
        if fp8.supported(model.device):  # the same forward with FP8 linear layers (bf16-equivalent FLOPs)
            weights = fp8.model_weights(model)
            fp8_ms = event_time_ms(lambda: model(idx, pos, logits_slice=slice(0, 0), linears=weights))
            out[backend].update(scoring_forward_fp8_ms=fp8_ms, scoring_linear_tflops_fp8=out["scoring_gemm"][
                "linear_flops"] / (fp8_ms * 1e-3) / 1e12)
        del step
        gc.collect()
        torch.cuda.empty_cache()
    model.block_backend = saved
    return out


def print_floors(f: dict):
    d, sc = f["decode_gemm"], f["scoring_gemm"]
    print(f"copy {f['copy_gbps']:.0f} GB/s (read+write), bf16 matmul {f['matmul_bf16_tflops']:.0f} TFLOP/s", flush=True)
    print(f"decode step floors ({d['rows']} rows): GEMMs alone {d['gemm_ms']:.2f} ms, weights read once at copy rate "
          f"{d['weight_read_ms']:.2f} ms; scoring ({sc['rows']} tokens): GEMMs alone {sc['gemm_ms']:.1f} ms "
          f"({sc['gemm_tflops']:.0f} TFLOP/s)", flush=True)
    for backend in ("eager", "compiled"):
        if backend in f:
            b = f[backend]
            print(f"  {backend:<9} decode step: graph {b['decode_step_graph_ms']:.2f} ms "
                  f"({b['decode_step_graph_ms'] / d['gemm_ms']:.2f}x GEMMs), eager {b['decode_step_eager_ms']:.2f} ms; "
                  f"scoring forward {b['scoring_forward_ms']:.1f} ms = {b['scoring_linear_tflops']:.0f} TFLOP/s "
                  f"on its linear layers; FP8 {b.get('scoring_forward_fp8_ms', float('nan')):.1f} ms = "
                  f"{b.get('scoring_linear_tflops_fp8', float('nan')):.0f} TFLOP/s bf16-equivalent", flush=True)


def main(argv=None):

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="*", default=[8192, 16384, 32768])
    p.add_argument("--long-contexts", type=int, nargs="*", default=[65536, 131072],
                   help="contexts where only the prefill methods (and dual while memory allows) run")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per case (median); vanilla and the long contexts run once")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 16],
                   help="batched prefill-attention throughput at --batch-context (requests of different lengths)")
    p.add_argument("--batch-context", type=int, default=16384)
    p.add_argument("--extrapolate", action="store_true", help="vanilla (and dual beyond --contexts) run 4 of the 32 "
                   "steps, the other steady steps counted at their measured median (labelled in the JSON)")
    p.add_argument("--no-agreement", action="store_true", help="leave out the prefill settings' topk_agreement")
    p.add_argument("--block-backend", choices=BLOCK_BACKENDS, default="auto",
                   help="the model every method runs (auto: the model's default; the floors measure eager and compiled)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    model = build_random(LLADA_8B, torch.bfloat16, "cuda")
    try:
        floor = floors(model)
        print_floors(floor)
    except Exception as e:  # the floors must not cost the end-to-end numbers
        print(f"floors failed: {e!r}", flush=True)
        floor = {"error": repr(e)[:500]}
    model.block_backend = args.block_backend
    results = {"environment": environment(), "model": asdict(LLADA_8B), "setup": {
        "question_tokens": 64, "prefix_tokens": 32, "gen_length": 32, "block_length": 32, "steps": 32,
        "threshold": None, "top_k": 4, "chunk_size": 1024, "weights": "random bf16 (meta init, filled on GPU)",
        "throughput": "output tokens only", "block_backend": args.block_backend,
        "timing": "wall clock with CUDA synchronisation, median of repeats; steps split by CUDA events"},
        "floors": floor, "runs": []}
    for method in args.methods:  # warm up every path (Triton compilation, cuBLAS heuristics)
        run_one(model, make_request(8192), method, steps=2)  # 8 chunks: a cascade runs its stages
    for n in args.contexts + args.long_contexts:
        request = make_request(n)
        rows = {}
        for method in args.methods:
            if n in args.long_contexts and method in ("vanilla", "dllm_cache", "dyllm"):
                continue  # full-sequence methods: hours of GPU at 64K+, and the dense caches do not fit
            try:
                once = method == "vanilla" or n in args.long_contexts  # dual at 128K: ~20 s a run
                scaled = args.extrapolate and (method == "vanilla" or (method == "dual" and n in args.long_contexts))
                reps = [run_one(model, request, method, extrapolate=scaled) for _ in range(1 if once else args.repeats)]
            except torch.OutOfMemoryError:
                print(f"{n:>7} {method:<18} out of memory", flush=True)
                results["runs"].append({"context_tokens": n, "method": method, "error": "out of memory"})
                continue
            except Exception as e:  # one failing case must not lose the others' numbers
                print(f"{n:>7} {method:<18} failed: {e!r}", flush=True)
                results["runs"].append({"context_tokens": n, "method": method, "error": repr(e)[:500]})
                continue
            row = sorted(reps, key=lambda r: r["total_s"])[len(reps) // 2]
            rows[method] = row
        for method, row in rows.items():
            row["context_tokens"] = n
            for base in ("vanilla", "dual"):
                if base in rows:
                    row[f"speedup_vs_{base}"] = rows[base]["total_s"] / row["total_s"]
                    row[f"step_speedup_vs_{base}"] = rows[base]["step_ms"] / row["step_ms"]
            results["runs"].append(row)
            print(f"{n:>7} {method:<18} total {row['total_s']:8.3f}s  score {row['score_s']:6.3f}s  "
                  f"build {row['build_s']:6.3f}s  decode {row['decode_s']:7.3f}s  step {row['step_ms']:7.2f}ms "
                  f"(refresh {row['refresh_step_ms']:.1f}, capture {row['capture_step_ms'] or 0:.1f}, steady "
                  f"{row['steady_step_ms'] or 0:.2f}, sampler {row['sampler_ms_per_step']:.3f})  "
                  f"mem {row['peak_mem_gb']:5.1f}GB  x{row.get('speedup_vs_vanilla', float('nan')):6.1f} vs vanilla  "
                  f"x{row.get('speedup_vs_dual', float('nan')):5.1f} vs dual", flush=True)
        if args.out:  # after every context, so a cut-off run still leaves its numbers
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    if not args.no_agreement:  # every prefill speed record carries its selection's quality
        toy: dict = {}
        for method in args.methods:
            if METHODS[method][0] == "prefill" and METHODS[method][1].get("score") != "draft":
                value = topk_agreement(METHODS[method][1], toy)
                for row in results["runs"]:
                    if row["method"] == method:
                        row["topk_agreement"] = value
                print(f"topk_agreement {method:<22} {value:.3f} (toy model, {AGREEMENT_REQUESTS} requests at "
                      f"{AGREEMENT_LENGTH} tokens, against full depth in bf16)", flush=True)
        results["agreement_setup"] = {"model": "embedded toy", "requests": AGREEMENT_REQUESTS, "length": AGREEMENT_LENGTH,
                                      "chunk_size": 128, "top_k": 4, "reference": "full-depth attention, bf16, same chunking"}
        del toy
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    for b in args.batch_sizes:  # batches of requests 1-10% shorter than batch_context, so rows are ragged
        batch = [make_request(args.batch_context - 64 * i, seed=i) for i in range(b)]
        row = run_one(model, batch, "prefill-attention")
        row["context_tokens"] = args.batch_context
        results.setdefault("batched", []).append(row)
        print(f"batch {b:>3} prefill-attention at {args.batch_context}: {row['output_tokens_per_s']:8.1f} output tok/s  "
              f"total {row['total_s']:.3f}s  mem {row['peak_mem_gb']:.1f}GB", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    return results


# ---- pytest-benchmark entry: `pytest --benchmark benchmarks/bench_e2e.py` ------------------------

@pytest.fixture(scope="module")
def llada8b():
    return build_random(LLADA_8B, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dual", "prefill-attention", "prefill-draft"])
def test_e2e_8k(benchmark, llada8b, e2e_results, method):
    """A whole request is host work and GPU work together: pytest-benchmark's wall clock (with a
    synchronize) is its true latency; the split of the steps goes to extra_info and the summary."""
    request = make_request(8192)
    run_one(llada8b, request, method, steps=2)  # warm-up
    rows = []
    benchmark.pedantic(lambda: rows.append(run_one(llada8b, request, method)), rounds=3, iterations=1)
    row = sorted(rows, key=lambda r: r["total_s"])[len(rows) // 2]
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str))})
    e2e_results[method] = row
    benchmark.group = "e2e 8K context, 32 steps"


if __name__ == "__main__":
    main()
