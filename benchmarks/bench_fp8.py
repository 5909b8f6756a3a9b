"""FP8 linear layers of the scoring forward: one LLaDA-8B block, bf16 against FP8, in one run.

One block of LLaDA-8B's shape (d_model 4096, 32 heads, MLP 12288; random bf16 weights, N(0, 0.02))
at the scoring forward's row counts: 9224 rows (8 chunks x 1153 tokens, bench_e2e's scoring batch)
and 32768 (8 x 4096). Variants, timed side by side:

* ``bf16_gemms``            the block's four GEMMs alone (wqkv, wo, gate_up, down), F.linear
* ``fp8_gemms``             the same four on pre-quantized e4m3 inputs, torch._scaled_mm with
                            row-wise scales (what FP8 allows when quantizing costs nothing)
* ``fp8_gemms_fast_accum``  the same with use_fast_accum (Hopper's faster, less exact accumulation)
* ``bf16_halves``           pdllm.model's attention_inputs + block_output, torch.compile'd as the
                            model runs them on a GPU, attention left out (a random y is fed in)
* ``fp8_halves``            pdllm.fp8's halves compiled: quantization fused into the norm, SiLU x
                            up and attention-output kernels, FP8 GEMMs
* ``fp8_halves_fast_accum`` the same with pdllm.fp8.FAST_ACCUM on
* ``fp8_halves_unfused``    pdllm.fp8's halves run eagerly: row amax, scale and cast as separate
                            ops (what fusing the quantization saves)

Reported per row count: each variant's time (ms), its rate on the linear layers (TFLOP/s,
2 M N K per GEMM, the same FLOPs for every variant) and the ratios to bf16 side by side, the
halves split into their two functions, beside the GPU's copy rate and bf16 matmul rate measured in
the same run (benchmarks/ceilings.py); and each halves variant's error against the same halves in
fp32 (q, k, v, and the block's update output - x), so that a speed and its accuracy are one record.
Timing: triton.testing.do_bench median after a warm-up, L2 flushed before every call, and each
call reads another of ``--copies`` input sets. Targets (issue 26): FP8 halves >= 1.5x the bf16
halves and >= 1000 TFLOP/s on the linear layers.

    python benchmarks/bench_fp8.py --out benchmarks/results/fp8_NVIDIA_H200.json
    pytest --benchmark benchmarks/bench_fp8.py           # 9224 rows through pytest-benchmark
    python benchmarks/bench_fp8.py --smoke --out /tmp/fp8.json   # CPU, tiny shapes: checks the script only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import LLADA_8B  # noqa: E402

from pdllm import fp8  # noqa: E402
from pdllm.environment import environment  # noqa: E402
from pdllm.fp8 import bf16_block_output  # noqa: E402
from pdllm.model import attention_inputs, build_random  # noqa: E402

VARIANTS = ("bf16_gemms", "fp8_gemms", "fp8_gemms_fast_accum", "bf16_halves", "fp8_halves", "fp8_halves_fast_accum",
            "fp8_halves_unfused")
HALVES = ("bf16_halves", "fp8_halves", "fp8_halves_fast_accum", "fp8_halves_unfused")
ROWS, BATCH = (9224, 32768), 8
TARGETS = {"fp8_halves_over_bf16_halves": 1.5, "fp8_halves_linear_tflops": 1000.0}
# A 1-layer LLaDA-8B-shaped model: the block's weights, RoPE, the vocabulary shrunk (the
# embedding and head play no part here).
BLOCK_8B = replace(LLADA_8B, n_layers=1, vocab_size=1024, mask_id=1, bos_id=2, eos_id=3)
SMOKE = replace(BLOCK_8B, d_model=256, n_heads=4, n_kv_heads=4, mlp_hidden=512)


class Block:
    """One block's weights (bf16 and FP8), its GEMM shapes and FLOPs."""

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.model = build_random(cfg, torch.bfloat16, device)
        blk = self.model.blocks[0]
        self.norms = (blk.attn_norm.weight, blk.mlp_norm.weight)
        self.bf16 = (blk.attn.wqkv.weight, blk.attn.o.weight, blk.mlp.gate_up.weight, blk.mlp.down.weight)
        self.fp8 = fp8.quantize_model(self.model).layers[0]

    def linear_flops(self, rows: int) -> dict:
        """{"attention_inputs": ..., "block_output": ...}: 2 M N K per GEMM."""
        wqkv, wo, gate_up, down = self.bf16
        return {"attention_inputs": 2 * rows * wqkv.numel(),
                "block_output": 2 * rows * (wo.numel() + gate_up.numel() + down.numel())}

    def inputs(self, rows: int, copies: int, seed: int = 0):
        """`copies` sets of (x, cos, sin, y) for rows = BATCH x T tokens."""
        cfg, device = self.cfg, self.model.device
        T = rows // BATCH
        g = torch.Generator(device=device).manual_seed(seed)
        cos, sin = self.model.rope(torch.arange(T, device=device).expand(BATCH, T))
        return [(torch.randn(BATCH, T, cfg.d_model, generator=g, device=device, dtype=torch.bfloat16), cos, sin,
                 torch.randn(BATCH, cfg.n_heads, T, cfg.head_dim, generator=g, device=device, dtype=torch.bfloat16))
                for _ in range(copies)]


def gemm_variants(block: Block, rows: int, copies: int) -> dict:
    """fn() per GEMM-only variant, each call on the next input set; inputs shared by K."""
    device = block.model.device
    g = torch.Generator(device=device).manual_seed(1)
    widths = sorted({w.shape[1] for w in block.bf16})
    bf16_in = [{k: torch.randn(rows, k, generator=g, device=device, dtype=torch.bfloat16) for k in widths}
               for _ in range(copies)]
    fp8_in = [{k: fp8.quantize_rows(x) for k, x in inputs.items()} for inputs in bf16_in]
    turn = iter(range(10**12))

    def bf16_gemms():
        inputs = bf16_in[next(turn) % copies]
        for w in block.bf16:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    def fp8_gemms(fast_accum: bool):
        inputs = fp8_in[next(turn) % copies]
        for w in (block.fp8.wqkv, block.fp8.wo, block.fp8.gate_up, block.fp8.down):
            x8, scale = inputs[w.data.shape[1]]
            torch._scaled_mm(x8, w.data.t(), scale, w.scale, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)

    return {"bf16_gemms": bf16_gemms, "fp8_gemms": lambda: fp8_gemms(False),
            "fp8_gemms_fast_accum": lambda: fp8_gemms(True)}


def halves_variants(block: Block, compiled: bool) -> dict:
    """{variant: fn(x, cos, sin, y, which) -> (q, k, v) and/or the block's output}; which is
    "attention_inputs", "block_output" or "both". compiled=False (the smoke run) runs every variant
    eagerly. The bf16 halves compile with static shapes (their best case: the model's own are
    dynamic after a first change of length); the FP8 ones are dynamic, as the scoring runs them."""
    cfg = block.cfg
    bf16 = (attention_inputs, bf16_block_output)
    if compiled:
        bf16 = tuple(torch.compile(f, fullgraph=True, dynamic=False) for f in bf16)
    unfused = (fp8.fp8_attention_inputs, fp8.fp8_block_output)
    fused = fp8.compiled_halves() if compiled else unfused
    q = block.fp8

    def runner(halves, weights, fast_accum: bool):
        (first, second), (w_qkv, w_o, w_gate_up, w_down) = halves, weights

        def run(x, cos, sin, y, which):
            fp8.FAST_ACCUM = fast_accum  # read when tracing: each value has its own compiled graph
            try:
                qkv = out = None
                if which in ("attention_inputs", "both"):
                    qkv = first(x, block.norms[0], cfg.norm_eps, w_qkv, None, cos, sin, cfg.n_heads, cfg.n_kv_heads)
                if which in ("block_output", "both"):
                    out = second(x, y, w_o, block.norms[1], cfg.norm_eps, w_gate_up, w_down)
                return qkv, out
            finally:
                fp8.FAST_ACCUM = False

        return run

    fp8_weights = (q.wqkv, q.wo, q.gate_up, q.down)
    return {"bf16_halves": runner(bf16, block.bf16, False), "fp8_halves": runner(fused, fp8_weights, False),
            "fp8_halves_fast_accum": runner(fused, fp8_weights, True),
            "fp8_halves_unfused": runner(unfused, fp8_weights, False)}


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def halves_error(block: Block, run, inputs) -> dict:
    """Relative (Frobenius) error of q, k, v and of the block's update (output - x: the residual
    would hide it) against the same halves in fp32 on the same weights, eager."""
    x, cos, sin, y = inputs
    w32 = [w.float() for w in block.bf16]
    n32 = [n.float() for n in block.norms]
    cfg = block.cfg
    exact_qkv = attention_inputs(x.float(), n32[0], cfg.norm_eps, w32[0], None, cos, sin, cfg.n_heads, cfg.n_kv_heads)
    exact_out = bf16_block_output(x.float(), y.float(), w32[1], n32[1], cfg.norm_eps, w32[2], w32[3])
    qkv, out = run(x, cos, sin, y, "both")
    errors = {name: relative_error(a, e) for name, a, e in zip("qkv", qkv, exact_qkv)}
    errors["block_update"] = relative_error(out.float() - x.float(), exact_out - x.float())
    return errors


def time_ms(fn, cuda: bool) -> float:
    """Median time of fn(): do_bench on a GPU (warm-up, L2 flushed before each call), wall clock on
    a CPU (the smoke run)."""
    fn()  # compiles, autotunes and warms the caches outside any timing
    if cuda:
        from triton.testing import do_bench

        torch.cuda.synchronize()
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure(block: Block, rows: int, copies: int, cuda: bool) -> dict:
    """One row count: every variant's ms and TFLOP/s, the halves split, the ratios to bf16."""
    flops = block.linear_flops(rows)
    total = sum(flops.values())
    ms, split = {}, {}
    for name, fn in gemm_variants(block, rows, copies).items():
        ms[name] = time_ms(fn, cuda)
    sets = block.inputs(rows, copies)
    turn = iter(range(10**12))
    errors = {}
    for name, run in halves_variants(block, compiled=cuda).items():
        split[name] = {which: time_ms(lambda: run(*sets[next(turn) % copies], which), cuda)
                       for which in ("attention_inputs", "block_output")}
        ms[name] = time_ms(lambda: run(*sets[next(turn) % copies], "both"), cuda)
        errors[name] = halves_error(block, run, sets[0])
    row = {"rows": rows, "batch": BATCH, "tokens_per_sequence": rows // BATCH, "linear_flops": flops, "ms": ms,
           "linear_tflops": {name: total / (t * 1e-3) / 1e12 for name, t in ms.items()},
           "halves_split_ms": split,
           "halves_split_tflops": {name: {w: flops[w] / (t * 1e-3) / 1e12 for w, t in s.items()}
                                   for name, s in split.items()},
           "error_vs_fp32": errors,
           "speedup_over_bf16": {name: (ms["bf16_gemms"] if "gemms" in name else ms["bf16_halves"]) / t
                                 for name, t in ms.items()}}
    row["fp8_halves_over_bf16_halves"] = row["speedup_over_bf16"]["fp8_halves"]
    row["fp8_halves_linear_tflops"] = row["linear_tflops"]["fp8_halves"]
    row["fp8_halves_over_fp8_gemms"] = ms["fp8_halves"] / ms["fp8_gemms"]  # the non-GEMM work's cost, with GEMMs' 1.0
    row["bf16_halves_over_bf16_gemms"] = ms["bf16_halves"] / ms["bf16_gemms"]
    return row


def print_row(row: dict):
    print(f"{row['rows']} rows ({row['batch']} x {row['tokens_per_sequence']}):", flush=True)
    print(f"  {'variant':<24}{'ms':>9}{'TFLOP/s':>9}{'x bf16':>8}{'attn_inputs ms':>16}{'block_output ms':>17}"
          f"{'err q':>8}{'err update':>12}")
    for name, t in row["ms"].items():
        s, e = row["halves_split_ms"].get(name), row["error_vs_fp32"].get(name)
        print(f"  {name:<24}{t:>9.3f}{row['linear_tflops'][name]:>9.0f}{row['speedup_over_bf16'][name]:>8.2f}"
              + (f"{s['attention_inputs']:>16.3f}{s['block_output']:>17.3f}{e['q']:>8.4f}{e['block_update']:>12.4f}"
                 if s else ""), flush=True)
    print("  err: relative Frobenius error against the fp32 halves on the same weights (update = output - x)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS),
                   help=f"token rows per forward (multiples of {BATCH})")
    p.add_argument("--copies", type=int, default=2, help="input sets the timed calls rotate through")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, eager: checks the script only")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here (use --smoke to check the script on a CPU)")
    rows = [2 * BATCH, 5 * BATCH] if args.smoke else args.rows
    if any(r % BATCH for r in rows):
        raise SystemExit(f"error: --rows must be multiples of {BATCH} (the forward's batch)")
    report = {"environment": environment(), "smoke": args.smoke, "model": asdict(SMOKE if args.smoke else BLOCK_8B),
              "weights": "random bf16, N(0, 0.02), norms ones, no bias", "variants": list(VARIANTS),
              "timing": ("triton.testing.do_bench median after warm-up, L2 flushed before each call, "
                         f"{args.copies} input sets rotated") if cuda else "CPU wall clock, median of 3 (smoke)",
              "targets": {}, "rows": []}
    if cuda:
        from ceilings import copy_gbps, matmul_tflops

        report.update(copy_gbps=copy_gbps(), matmul_bf16_tflops=matmul_tflops())
        print(f"copy {report['copy_gbps']:.0f} GB/s (read+write), "
              f"bf16 matmul {report['matmul_bf16_tflops']:.0f} TFLOP/s", flush=True)
    block = Block(SMOKE if args.smoke else BLOCK_8B, "cuda" if cuda else "cpu")
    for r in rows:
        row = measure(block, r, args.copies, cuda)
        report["rows"].append(row)
        print_row(row)
        if cuda:
            torch.cuda.empty_cache()
    for r in report["rows"]:
        for key, floor in TARGETS.items():
            report["targets"][f"{key} >= {floor:g} at {r['rows']} rows"] = {"measured": r[key], "met": r[key] >= floor}
    for name, t in report["targets"].items():
        print(f"target {name}: {t['measured']:.2f} ({'met' if t['met'] else 'NOT met'})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return report


# ---- pytest-benchmark entry: `pytest --benchmark benchmarks/bench_fp8.py` -----------------------


@pytest.fixture(scope="module")
def block_8b():
    return Block(BLOCK_8B, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_block(benchmark, gpu_ceilings, block_8b, variant):
    """One variant at 9224 rows; pytest-benchmark's clock includes a synchronize per round (the
    calls are milliseconds long: the host's part is small); do_bench's median goes to extra_info."""
    rows = ROWS[0]
    if "gemms" in variant:
        fn = gemm_variants(block_8b, rows, 2)[variant]
    else:
        run, sets = halves_variants(block_8b, compiled=True)[variant], block_8b.inputs(rows, 2)
        turn = iter(range(10**9))
        fn = lambda: run(*sets[next(turn) % 2], "both")  # noqa: E731
    ms = time_ms(fn, cuda=True)
    total = sum(block_8b.linear_flops(rows).values())
    benchmark.group = f"LLaDA-8B block, {rows} rows"
    benchmark.extra_info.update(variant=variant, rows=rows, do_bench_ms=ms, linear_tflops=total / (ms * 1e-3) / 1e12,
                                copy_gbps=gpu_ceilings["copy_gbps"],
                                matmul_bf16_tflops=gpu_ceilings["matmul_bf16_tflops"])

    def call_and_sync():
        fn()
        torch.cuda.synchronize()

    with torch.no_grad():
        benchmark.pedantic(call_and_sync, rounds=20, warmup_rounds=3)


if __name__ == "__main__":
    main()
