"""End-to-end latency of one long-context request, every method side by side on one GPU.

LLaDA-8B-shaped model with random bf16 weights (built on the meta device, filled on the GPU: no
download), one request = prefix + context (8K..128K tokens) + question (~64 tokens), answer of 32
tokens in one block of 32 with 32 fixed steps (threshold off, so every method does the same
number of denoising steps). Methods: vanilla (whole sequence every step), dual (Fast-dLLM dual
cache), prefill-attention and prefill-draft (Prefilling-dLLM, top-4 of 1024-token chunks),
dllm_cache and dyllm (their recomputed fraction is reported: their cost follows it).

Reported per (context, method): end-to-end latency and its split (scoring, cache build, decode
steps), the mean step time, peak GPU memory, and speedups over vanilla and dual *measured in the
same run*. Throughput is output tokens only; NFE = number of model forwards of the decode loop.

    python benchmarks/bench_e2e.py --out benchmarks/results/e2e_<device>.json
    pytest --benchmark benchmarks/bench_e2e.py     # the 8K case through pytest-benchmark
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import asdict

import pytest
import torch

from pdllm.environment import environment
from pdllm.model import ModelConfig, build_random

LLADA_8B = ModelConfig()  # ModelConfig's defaults are LLaDA-8B's shape and special tokens
METHODS = {
    "vanilla": ("vanilla", {}),
    "dual": ("dual", {}),
    "prefill-attention": ("prefill", dict(score="attention", top_k=4, chunk_size=1024)),
    "prefill-draft": ("prefill", dict(score="draft", top_k=4, chunk_size=1024)),
    "dllm_cache": ("dllm_cache", {}),  # K_p=100, K_r=8, rho=0.25: cost follows the recomputed fraction
    "dyllm": ("dyllm", {}),  # num_full_steps=4, tau=0.99
}


def make_request(context_tokens: int, question_tokens: int = 64, prefix_tokens: int = 32, seed: int = 0):
    from pdllm.tokenizer import LongContextPrompt

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1000, 100000, (n,), generator=g).tolist()  # noqa: E731
    return LongContextPrompt(prefix=[LLADA_8B.bos_id] + ids(prefix_tokens - 1), context=ids(context_tokens),
                             query=ids(question_tokens))


def run_one(model, request, method: str, steps: int = 32) -> dict:
    """One request (or a list of requests: one batch) through one method, timed."""
    from pdllm.sampler import GenerationConfig, generate

    name, kwargs = METHODS[method]
    config = GenerationConfig(gen_length=32, block_length=32, steps=steps)
    gc.collect()  # whatever an earlier run left in reference cycles must not count in this one's peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    batch = request if isinstance(request, list) else [request]
    out = generate(model, batch, config, method=name, **kwargs)
    s = out.stats
    row = {"method": method, "total_s": s["total_s"], "score_s": s.get("score_s", 0.0),
           "build_s": s.get("build_s", s["begin_s"]), "decode_s": s["decode_s"], "nfe": out.nfe,
           "step_ms": 1e3 * s["decode_s"] / out.nfe, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
           "batch": len(batch), "output_tokens_per_s": len(batch) * config.gen_length / s["total_s"]}
    if name == "prefill":
        row.update(selected=s["selected"][0], n_chunks=s["chunks"][0], kv_rows=s["kv_rows"][0])
    if "recomputed_fraction" in s:  # dLLM-Cache / DyLLM: their cost depends on it
        row["recomputed_fraction"] = s["recomputed_fraction"]
    return row


def main(argv=None):

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="*", default=[8192, 16384, 32768])
    p.add_argument("--long-contexts", type=int, nargs="*", default=[65536, 131072],
                   help="contexts where only the prefill methods (and dual while memory allows) run")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--repeats", type=int, default=2, help="runs per case (median); vanilla runs once")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 16],
                   help="batched prefill-attention throughput at --batch-context (requests of different lengths)")
    p.add_argument("--batch-context", type=int, default=16384)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    model = build_random(LLADA_8B, torch.bfloat16, "cuda")
    results = {"environment": environment(), "model": asdict(LLADA_8B), "setup": {
        "question_tokens": 64, "prefix_tokens": 32, "gen_length": 32, "block_length": 32, "steps": 32,
        "threshold": None, "top_k": 4, "chunk_size": 1024, "weights": "random bf16 (meta init, filled on GPU)",
        "throughput": "output tokens only", "timing": "wall clock with CUDA synchronisation, median of repeats"},
        "runs": []}
    for method in args.methods:  # warm up every path (Triton compilation, cuBLAS heuristics)
        run_one(model, make_request(4096), method, steps=2)
    for n in args.contexts + args.long_contexts:
        request = make_request(n)
        rows = {}
        for method in args.methods:
            if n in args.long_contexts and method in ("vanilla", "dllm_cache", "dyllm"):
                continue  # full-sequence methods: hours of GPU at 64K+, and the dense caches do not fit
            try:
                reps = [run_one(model, request, method) for _ in range(1 if method == "vanilla" else args.repeats)]
            except torch.OutOfMemoryError:
                print(f"{n:>7} {method:<18} out of memory", flush=True)
                results["runs"].append({"context_tokens": n, "method": method, "error": "out of memory"})
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
                  f"build {row['build_s']:6.3f}s  decode {row['decode_s']:7.3f}s  step {row['step_ms']:7.2f}ms  "
                  f"mem {row['peak_mem_gb']:5.1f}GB  x{row.get('speedup_vs_vanilla', float('nan')):6.1f} vs vanilla  "
                  f"x{row.get('speedup_vs_dual', float('nan')):5.1f} vs dual", flush=True)
        if args.out:  # after every context, so a cut-off run still leaves its numbers
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
def test_e2e_8k(benchmark, llada8b, method):
    request = make_request(8192)
    run_one(llada8b, request, method, steps=2)  # warm-up
    row = benchmark.pedantic(run_one, args=(llada8b, request, method), rounds=3, iterations=1)
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str))})
    benchmark.group = "e2e 8K context, 32 steps"


if __name__ == "__main__":
    main()
