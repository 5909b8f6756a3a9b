"""Chunk-sparse attention: pdllm's Triton kernel against the alternatives, in one run.

Shape: one LLaDA-8B attention layer (32 query heads, 32 KV heads, head_dim 128, bf16) with a
block of Tq = 32 query rows.

* ``sparse-<P>``: the selected KV is 4 chunks of 1024 pool rows (random chunks, top-K order) plus
  100 "prefix/query/block" rows at the end of the pool, out of a pool of P rows (8K .. 128K).
* ``full-<P>``:   every pool row is selected (P = 8K, 16K, 32K).

Implementations (same inputs):

* ``pdllm``        the split-KV kernel reading rows through the index (no copy)
* ``sdpa_gather``  index_select of K and V into contiguous tensors, then SDPA
* ``flex``         FlexAttention (torch.compile'd, compile excluded) over the whole pool with a
                   128x128 block mask of the selected rows (a mask_mod for partial blocks)
* ``sdpa_dense``   SDPA over the whole pool (no sparsity: what chunk selection saves)

Timing: ``triton.testing.do_bench`` median (CUDA events, L2 flushed between runs) is the number
reported in extra_info (time_us, GB/s, % of the measured copy bandwidth); pytest-benchmark's own
columns are host wall time of call + synchronize, so they include launch overhead.
Bytes "needed" = the selected K and V rows + q + out, the same count for every implementation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

H = HKV = 32
D = 128
TQ = 32
CHUNK = 1024
TOP_K = 4
EXTRA = 100
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Case:
    pool: int
    full: bool

    @property
    def name(self):
        return f"{'full' if self.full else 'sparse'}-{self.pool // 1024}K"


CASES = [Case(p * 1024, False) for p in (8, 16, 32, 64, 128)] + [Case(p * 1024, True) for p in (8, 16, 32)]
IMPLS = ["pdllm", "sdpa_gather", "flex", "sdpa_dense"]


@functools.lru_cache(maxsize=1)  # one case's tensors at a time (the 128K pool is 2 GiB)
def inputs(case: Case):
    g = torch.Generator(device="cuda").manual_seed(case.pool + case.full)
    P = case.pool
    q = torch.randn(1, H, TQ, D, device="cuda", dtype=DTYPE, generator=g)
    k_pool = torch.randn(HKV, P, D, device="cuda", dtype=DTYPE, generator=g)
    v_pool = torch.randn(HKV, P, D, device="cuda", dtype=DTYPE, generator=g)
    if case.full:
        index = torch.arange(P, device="cuda")
    else:
        chunks = torch.randperm(P // CHUNK - 1, device="cuda", generator=g)[:TOP_K]  # the last chunk holds the extras
        rows = (chunks[:, None] * CHUNK + torch.arange(CHUNK, device="cuda")).flatten()
        index = torch.cat([rows, torch.arange(P - EXTRA, P, device="cuda")])
    index = index.to(torch.int32)
    kv_len = torch.tensor([index.numel()], dtype=torch.int32, device="cuda")
    return q, k_pool, v_pool, index[None].contiguous(), kv_len


def make_impl(impl: str, case: Case):
    q, k_pool, v_pool, index, kv_len = inputs(case)
    if impl == "pdllm":
        from pdllm.triton_kernels.chunk_attention import chunk_attention

        return lambda: chunk_attention(q, k_pool, v_pool, index, kv_len)[0]
    if impl == "sdpa_gather":
        idx = index[0].long()

        def gather_sdpa():
            k = k_pool.index_select(1, idx)[None]
            v = v_pool.index_select(1, idx)[None]
            return F.scaled_dot_product_attention(q, k, v)

        return gather_sdpa
    if impl == "sdpa_dense":
        return lambda: F.scaled_dot_product_attention(q, k_pool[None], v_pool[None])
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        selected = torch.zeros(case.pool, dtype=torch.bool, device="cuda")
        selected[index[0].long()] = True

        def mask_mod(b, h, q_idx, kv_idx):
            return selected[kv_idx]

        block_mask = create_block_mask(mask_mod, None, None, TQ, case.pool, device="cuda", BLOCK_SIZE=128)
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda: flex(q, k_pool[None], v_pool[None], block_mask=block_mask)
    raise ValueError(impl)


def needed_bytes(case: Case) -> int:
    _, _, _, index, _ = inputs(case)
    elem = torch.finfo(DTYPE).bits // 8
    return index.numel() * HKV * D * 2 * elem + 2 * H * TQ * D * elem


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_chunk_attention(benchmark, gpu_ceilings, bench_results, case, impl):
    from triton.testing import do_bench

    from pdllm.attention import chunk_attention_reference
    from pdllm.testing import assert_close

    benchmark.group = case.name
    fn = make_impl(impl, case)
    out = fn()  # compiles (flex, triton) outside any timing
    torch.cuda.synchronize()
    if impl != "sdpa_dense" or case.full:  # dense over the whole pool is a different function when sparse
        q, k_pool, v_pool, index, kv_len = inputs(case)
        if case.pool <= 32 * 1024 or not case.full:
            ref = chunk_attention_reference(q, k_pool, v_pool, index, kv_len)[0]
            assert_close(out, ref, dtype=DTYPE, msg=f"{impl} disagrees with the reference")
            del ref
    ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    nbytes = needed_bytes(case)
    gbps = nbytes / (ms * 1e-3) / 1e9
    info = {
        "impl": impl,
        "shape": case.name,
        "pool_rows": case.pool,
        "selected_rows": inputs(case)[3].numel(),
        "heads": H, "kv_heads": HKV, "head_dim": D, "q_rows": TQ, "dtype": str(DTYPE).removeprefix("torch."),
        "time_us": ms * 1e3,
        "needed_bytes": nbytes,
        "gbps": gbps,
        "pct_copy_bw": 100 * gbps / gpu_ceilings["copy_gbps"],
        "copy_gbps": gpu_ceilings["copy_gbps"],
        "matmul_bf16_tflops": gpu_ceilings["matmul_bf16_tflops"],
        "device": gpu_ceilings.get("device"),
    }
    benchmark.extra_info.update(info)
    bench_results.setdefault(case.name, {})[impl] = info

    def call_and_sync():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call_and_sync, rounds=30, warmup_rounds=3)
