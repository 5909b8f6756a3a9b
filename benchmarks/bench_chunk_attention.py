"""Chunk-sparse attention: pdllm's Triton kernel against the alternatives, in one run.

Shape: one LLaDA-8B attention layer (32 query heads, 32 KV heads, head_dim 128, bf16) with a
block of Tq = 32 query rows. The K/V pool has the layout of ``ChunkKVCache``: row-major storage
(layers, P, Hkv, D), read through (layers, Hkv, P, D) views.

* ``sparse-<P>``: the selected KV is 4 chunks of 1024 pool rows (random chunks, top-K order) plus
  100 "prefix/query/block" rows at the end of the pool, out of a pool of P rows (8K .. 128K).
* ``full-<P>``:   every pool row is selected (P = 8K, 16K, 32K).

Implementations (same inputs):

* ``pdllm``        the split-KV kernel reading rows through the index (no copy)
* ``sdpa_gather``  index_select of K and V into contiguous tensors, then SDPA
* ``flex``         FlexAttention (torch.compile'd, compile excluded) over the whole pool with a
                   128x128 block mask of the selected rows (a mask_mod for partial blocks)
* ``sdpa_dense``   SDPA over the whole pool (no sparsity: what chunk selection saves)

Timing, two ways, both reported in extra_info and in the summary table printed at the end, each in
its own labelled column. pytest-benchmark's own table times the second one (rounds of CUDA-graph
replays and one synchronize, its clock divided by the calls per round: ``per_call_clock``), so it
reads in GPU time per call:

* ``time_us``: ``triton.testing.do_bench`` median. do_bench zeroes a 256 MB buffer before every
  call to flush L2; the dirty lines it leaves are written back while the timed kernel runs, which
  costs up to ~50 MB of extra traffic, and it launches one call at a time, so a call shorter than
  the host's launch path is timed at the launch path (200-260 us for every method on the sparse
  shapes on the H100 machine of benchmarks/results): the time of an eager call, not of the kernel.
* ``time_us_rotating``: a CUDA graph of ROTATE calls, each on another layer of a
  (ROTATE, Hkv, P, D) cache (what a model does: consecutive attention calls read different
  layers), replayed back to back, no flush; median over batches of replays, per call.

Bytes "needed" = the selected K and V rows + q + out, the same count for every implementation;
GB/s and % of the measured copy bandwidth are given for both timings.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

H = HKV = 32
D = 128
TQ = 32
CHUNK = 1024
TOP_K = 4
EXTRA = 100
DTYPE = torch.bfloat16
ROTATE = 4  # layers the rotating timing cycles through


@dataclass(frozen=True)
class Case:
    pool: int
    full: bool

    @property
    def name(self):
        return f"{'full' if self.full else 'sparse'}-{self.pool // 1024}K"


CASES = [Case(p * 1024, False) for p in (8, 16, 32, 64, 128)] + [Case(p * 1024, True) for p in (8, 16, 32)]
IMPLS = ["pdllm", "sdpa_gather", "flex", "sdpa_dense"]


@functools.lru_cache(maxsize=1)  # one case's tensors at a time (the 128K pool is 8 GiB over 4 layers)
def inputs(case: Case):
    g = torch.Generator(device="cuda").manual_seed(case.pool + case.full)
    P = case.pool
    q = torch.randn(1, H, TQ, D, device="cuda", dtype=DTYPE, generator=g)
    # Laid out as ChunkKVCache stores its pool: (layers, P, Hkv, D) storage, (layers, Hkv, P, D) views.
    k_cache = torch.randn(ROTATE, P, HKV, D, device="cuda", dtype=DTYPE, generator=g).transpose(1, 2)
    v_cache = torch.randn(ROTATE, P, HKV, D, device="cuda", dtype=DTYPE, generator=g).transpose(1, 2)
    index = torch.arange(P, device="cuda", dtype=torch.int32)[None] if case.full else sparse_index(P, g)
    kv_len = torch.tensor([index.shape[1]], dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, index, kv_len


def sparse_index(P: int, g: torch.Generator) -> torch.Tensor:
    """(1, TOP_K * CHUNK + EXTRA) int32: TOP_K random chunks of a P-row pool, then its last EXTRA rows."""
    chunks = torch.randperm(P // CHUNK - 1, device="cuda", generator=g)[:TOP_K]  # the last chunk holds the extras
    rows = (chunks[:, None] * CHUNK + torch.arange(CHUNK, device="cuda")).flatten()
    return torch.cat([rows, torch.arange(P - EXTRA, P, device="cuda")]).to(torch.int32)[None].contiguous()


def make_impl(impl: str, case: Case):
    """fn(layer) -> out, for one layer of the cache."""
    q, k_cache, v_cache, index, kv_len = inputs(case)
    if impl == "pdllm":
        from pdllm.triton_kernels.chunk_attention import chunk_attention

        return lambda i: chunk_attention(q, k_cache[i], v_cache[i], index, kv_len)[0]
    if impl == "sdpa_gather":
        idx = index[0].long()

        def gather_sdpa(i):
            k = k_cache[i].index_select(1, idx)[None]
            v = v_cache[i].index_select(1, idx)[None]
            return F.scaled_dot_product_attention(q, k, v)

        return gather_sdpa
    if impl == "sdpa_dense":
        return lambda i: F.scaled_dot_product_attention(q, k_cache[i][None], v_cache[i][None])
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        selected = torch.zeros(case.pool, dtype=torch.bool, device="cuda")
        selected[index[0].long()] = True

        def mask_mod(b, h, q_idx, kv_idx):
            return selected[kv_idx]

        block_mask = create_block_mask(mask_mod, None, None, TQ, case.pool, device="cuda", BLOCK_SIZE=128)
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda i: flex(q, k_cache[i][None], v_cache[i][None], block_mask=block_mask)
    raise ValueError(impl)


REPLAYS = 10  # replays of the ROTATE-call graph per timed batch
CALLS_PER_ROUND = REPLAYS * ROTATE


def per_call_clock() -> float:
    """pytest-benchmark's clock for this file: each of its rounds runs CALLS_PER_ROUND calls (graph
    replays, then one synchronize), so a clock that ticks CALLS_PER_ROUND times slower makes its
    table read in time per call: the GPU's time, not the host's launch path."""
    return time.perf_counter() / CALLS_PER_ROUND


def rotating_runner(fn) -> tuple:
    """(run, method): run() makes ROTATE calls on different layers, replayed from one CUDA graph.
    Falls back to a plain loop of launches if the implementation cannot be captured."""
    for i in range(ROTATE):  # warm-up / compile outside capture
        fn(i)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(ROTATE):
                fn(i)
        run, method = graph.replay, "cuda-graph"
    except Exception:  # noqa: BLE001 - any capture failure: time launches instead
        torch.cuda.synchronize()

        def run():
            for i in range(ROTATE):
                fn(i)

        method = "launch-loop"
    run()
    torch.cuda.synchronize()
    return run, method


def rotating_time_ms(fn) -> tuple[float, str]:
    """Per-call median of CUDA-graph replays of ROTATE calls on different layers (no L2 flush),
    and how they were run ("cuda-graph", or "launch-loop" where capture failed)."""
    run, method = rotating_runner(fn)
    return replay_time_ms(run), method


def replay_time_ms(run) -> float:
    """Per-call median (CUDA events) of batches of REPLAYS runs of rotating_runner's run."""
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_ROUND)
    return sorted(times)[len(times) // 2]


def needed_bytes(case: Case) -> int:
    """Bytes every implementation must move (pdllm's bytes_moved: selected K and V rows, q and out)."""
    from pdllm.triton_kernels.chunk_attention import bytes_moved

    q, k_cache, _, index, _ = inputs(case)
    return bytes_moved(q, k_cache[0], index)


@pytest.mark.benchmark(timer=per_call_clock)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_chunk_attention(benchmark, gpu_ceilings, bench_results, case, impl):
    from triton.testing import do_bench

    from pdllm.attention import chunk_attention_reference
    from pdllm.testing import assert_close

    benchmark.group = case.name
    fn = make_impl(impl, case)
    out = fn(0)  # compiles (flex, triton) outside any timing
    torch.cuda.synchronize()
    if impl != "sdpa_dense" or case.full:  # dense over the whole pool is a different function when sparse
        q, k_cache, v_cache, index, kv_len = inputs(case)
        ref = chunk_attention_reference(q, k_cache[0], v_cache[0], index, kv_len)[0]
        assert_close(out, ref, dtype=DTYPE, msg=f"{impl} disagrees with the reference")
        del ref
    ms = do_bench(lambda: fn(0), warmup=25, rep=200, return_mode="median")
    run, method = rotating_runner(fn)
    ms_rot = replay_time_ms(run)
    nbytes = needed_bytes(case)
    copy = gpu_ceilings["copy_gbps"]
    gbps = nbytes / (ms * 1e-3) / 1e9
    gbps_rot = nbytes / (ms_rot * 1e-3) / 1e9
    info = {
        "impl": impl,
        "shape": case.name,
        "pool_rows": case.pool,
        "selected_rows": inputs(case)[3].numel(),
        "heads": H, "kv_heads": HKV, "head_dim": D, "q_rows": TQ, "dtype": str(DTYPE).removeprefix("torch."),
        "needed_bytes": nbytes,
        "time_us": ms * 1e3,
        "gbps": gbps,
        "pct_copy_bw": 100 * gbps / copy,
        "time_us_rotating": ms_rot * 1e3,
        "gbps_rotating": gbps_rot,
        "pct_copy_bw_rotating": 100 * gbps_rot / copy,
        "rotating_method": method,
        "copy_gbps": copy,
        "matmul_bf16_tflops": gpu_ceilings["matmul_bf16_tflops"],
        "device": gpu_ceilings.get("device"),
    }
    benchmark.extra_info.update(info)
    bench_results.setdefault(case.name, {})[impl] = info

    def replays_and_sync():  # CALLS_PER_ROUND calls: per_call_clock divides them out
        for _ in range(REPLAYS):
            run()
        torch.cuda.synchronize()

    benchmark.pedantic(replays_and_sync, rounds=15, warmup_rounds=2)
