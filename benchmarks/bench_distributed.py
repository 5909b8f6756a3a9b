"""Chunk-parallel scoring across GPUs: one long request at 1, 2, 4 and 8 GPUs, side by side.

LLaDA-8B-shaped model with random bf16 weights (meta device, filled on each rank's GPU), one
request = prefix + context (128K, 512K tokens) + question, prefill-attention top-4 of 1024-token
chunks with ``chunk_parallel=True``, answer of 32 tokens in one block of 32 with 32 fixed steps
(bench_e2e's request and decode). For each GPU count the script runs one torchrun job (NCCL, one
process per GPU, NVLink multicast off); every rank scores its share of the chunks, the scores are
all-gathered, every rank decodes the same answer.

Reported per (GPUs, context), each the faster of ``--repeats`` runs after a warm-up: scoring time
(the slowest rank's, all-gather included, and every rank's; the ranks start each request at a barrier), cache build, decode and end-to-end time, peak
memory per rank; beside them, from the 1-GPU run of the same sweep, the speedups and the floors
the split allows: scoring at N GPUs >= 1-GPU scoring / N, end to end >= decode + 1-GPU scoring / N
(the decode is not split: every rank runs it). The JSON carries device, GPU count and versions.

    python benchmarks/bench_distributed.py --gpus 1 2 4 8 --contexts 131072 524288 \\
        --out benchmarks/results/distributed_NVIDIA_H200.json
    python benchmarks/bench_distributed.py --smoke --gpus 1 2 --contexts 4096   # CPU: checks the script only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import LLADA_8B, make_request  # noqa: E402

from pdllm import distributed  # noqa: E402
from pdllm.environment import environment  # noqa: E402
from pdllm.model import build_random  # noqa: E402

KNOBS = dict(score="attention", top_k=4, chunk_size=1024, chunk_parallel=True)
TARGETS = {"scoring_8_gpus_over_1": 1 / 6, "e2e_speedup_8_gpus_128k": 3.0}  # issue 21's


def smoke_config():
    """LLaDA-8B's vocabulary and special tokens, two narrow layers: runs on a CPU (figures meaningless)."""
    from dataclasses import replace

    return replace(LLADA_8B, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=512)


def run_request(model, context: int) -> dict:
    from pdllm.prefill import Prefill
    from pdllm.sampler import GenerationConfig, generate

    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank starts the request together: its times are the job's
    out = generate(model, [make_request(context)], GenerationConfig(gen_length=32, block_length=32, steps=32),
                   method=Prefill(**KNOBS))
    s = out.stats
    return {"total_s": s["total_s"], "score_s": s["score_s"], "build_s": s["build_s"], "decode_s": s["decode_s"],
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "selected": s["selected"][0], "n_chunks": s["chunks"][0], "tokens": out.tokens[0].tolist()}


def worker(args):
    """One rank of a torchrun job: the sweep over contexts; rank 0 writes the rows to args.part."""
    distributed.init()
    smoke = args.smoke
    model = build_random(smoke_config() if smoke else LLADA_8B, torch.float32 if smoke else torch.bfloat16,
                         "cpu" if smoke else "cuda")
    run_request(model, 8192 if not smoke else 2048)  # warm-up: kernels compiled and tuned, graphs captured
    rows = []
    for context in args.contexts:
        runs = [run_request(model, context) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["total_s"])
        every = distributed.all_gather_json(best, "the benchmark's per-rank figures")
        assert all(r["tokens"] == best["tokens"] for r in every), "ranks decoded different answers"
        del best["tokens"]
        slowest = max(every, key=lambda r: r["total_s"])  # the job is done when its last rank is
        rows.append({"gpus": distributed.world_size(), "context": context, **best, "total_s": slowest["total_s"],
                     "score_s": max(r["score_s"] for r in every), "score_s_per_rank": [r["score_s"] for r in every],
                     "total_s_per_rank": [r["total_s"] for r in every],
                     "peak_mem_gb_per_rank": [r["peak_mem_gb"] for r in every], "repeats": args.repeats})
        if distributed.is_main():
            print(json.dumps(rows[-1]), flush=True)
    if distributed.is_main():
        Path(args.part).write_text(json.dumps(rows))


def add_comparisons(rows: list[dict]) -> None:
    """Speedups over the 1-GPU row of the same context, and the floors the split allows."""
    one = {r["context"]: r for r in rows if r["gpus"] == 1}
    for r in rows:
        base = one.get(r["context"])
        if base is None:
            continue
        n = r["gpus"]
        r.update(scoring_speedup=base["score_s"] / r["score_s"], e2e_speedup=base["total_s"] / r["total_s"],
                 scoring_floor_s=base["score_s"] / n, e2e_floor_s=r["decode_s"] + r["build_s"] + base["score_s"] / n,
                 scoring_over_1_gpu=r["score_s"] / base["score_s"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts, one torchrun job each")
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--timeout", type=int, default=1800, help="seconds one torchrun job may take")
    p.add_argument("--smoke", action="store_true", help="a 2-layer model on CPU gloo ranks: checks the script, "
                   "measures nothing worth keeping")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one rank of a job (torchrun runs it)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.smoke and torch.cuda.device_count() < max(args.gpus):
        raise SystemExit(f"error: --gpus {max(args.gpus)} needs that many GPUs; this machine has "
                         f"{torch.cuda.device_count()} (use --smoke to check the script on a CPU)")
    env = {**os.environ, **distributed.MULTICAST_OFF}  # kept off in every rank (device notes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.gpus:
            part = Path(tmp, f"gpus{n}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
                   "--worker", "--part", str(part), "--repeats", str(args.repeats), "--contexts",
                   *map(str, args.contexts)] + (["--smoke"] if args.smoke else [])
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
            rows += json.loads(part.read_text())
    add_comparisons(rows)
    at = {(r["gpus"], r["context"]): r for r in rows}
    targets = {}
    if (8, 131072) in at and "scoring_over_1_gpu" in at[(8, 131072)]:
        for ctx in args.contexts:
            if (8, ctx) in at:
                v = at[(8, ctx)]["scoring_over_1_gpu"]
                targets[f"scoring at 8 GPUs <= 1/6 of 1 GPU ({ctx})"] = {"measured": v, "met": v <= TARGETS["scoring_8_gpus_over_1"]}
        v = at[(8, 131072)]["e2e_speedup"]
        targets["end to end at 128K >= 3x one GPU"] = {"measured": v, "met": v >= TARGETS["e2e_speedup_8_gpus_128k"]}
    report = {"environment": environment(), "gpu_count": torch.cuda.device_count(), "smoke": args.smoke,
              "model": "LLaDA-8B shape, random bf16" if not args.smoke else "smoke: 2 layers, fp32, CPU",
              "knobs": KNOBS, "generation": dict(gen_length=32, block_length=32, steps=32),
              "nccl": str(torch.cuda.nccl.version()) if torch.cuda.is_available() else None,
              "multicast_off": distributed.MULTICAST_OFF, "rows": rows, "targets": targets}
    for r in rows:
        print(f"{r['gpus']} GPU(s) {r['context']:>7d} tokens: scoring {r['score_s']:.3f} s  end to end "
              f"{r['total_s']:.3f} s" + (f"  (scoring x{r['scoring_speedup']:.2f}, floor {r['scoring_floor_s']:.3f} s; "
                                       f"e2e x{r['e2e_speedup']:.2f}, floor {r['e2e_floor_s']:.3f} s)"
                                       if "scoring_speedup" in r else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
