"""ChunkKVCache: its pool layout, and that what goes in through store/attend is what attention reads."""

import torch

from pdllm.attention import reference_attention
from pdllm.cache import ChunkKVCache
from pdllm.testing import assert_close


def test_pool_rows_hold_every_head_contiguously():
    # Row-major storage (L, P, Hkv, D) behind (L, Hkv, P, D) views: the kernel's DRAM locality
    # depends on it (benchmarks/probe_pool_layout.py), so a change of layout should be deliberate.
    L, Hkv, P, D = 2, 3, 10, 8
    cache = ChunkKVCache(L, Hkv, D, P, torch.float32, "cpu")
    assert cache.k.shape == cache.v.shape == (L, Hkv, P, D)
    assert cache.k.stride() == cache.v.stride() == (P * Hkv * D, D, Hkv * D, 1)
    assert cache.capacity == P


def test_store_then_attend_reads_the_indexed_rows():
    torch.manual_seed(0)
    L, Hkv, H, D, Tq = 2, 2, 4, 8, 3
    cache = ChunkKVCache(L, Hkv, D, capacity=40, dtype=torch.float32, device="cpu")
    context = cache.allocate(20)
    k_ctx, v_ctx = torch.randn(2, L, Hkv, 20, D).unbind(0)
    cache.store(context, k_ctx, v_ctx)
    block = cache.allocate(Tq)
    keep = torch.tensor([3, 0, 17, 9, 4])  # any subset of the context, any order, then the block
    cache.set_index([torch.cat([context[keep], block])])
    cache.set_write_rows(block[None])

    layer = 1
    q = torch.randn(1, H, Tq, D)
    k_blk, v_blk = torch.randn(2, 1, Hkv, Tq, D).unbind(0)
    out = cache.attend(layer, q, k_blk, v_blk, backend="reference")

    keys = torch.cat([k_ctx[layer][:, keep], k_blk[0]], dim=1)[None]  # (1, Hkv, 5 + Tq, D)
    values = torch.cat([v_ctx[layer][:, keep], v_blk[0]], dim=1)[None]
    expected, _ = reference_attention(q, keys, values)
    assert_close(out, expected, dtype=torch.float32)
    assert_close(cache.k[layer][:, block], k_blk[0], dtype=torch.float32)  # written in place
