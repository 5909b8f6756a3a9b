"""cache.py: ChunkKVCache's pool layout, allocation, index and views, DenseKVCache's windows, the
KVRecorder; what goes in through store/attend is what attention reads."""

import pytest
import torch

from pdllm.attention import reference_attention
from pdllm.cache import ChunkKVCache, DenseKVCache, KVRecorder
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


# ---- ChunkKVCache: allocation, index, views, errors ----------------------------------------------

def test_allocate_hands_out_consecutive_rows_until_the_pool_is_full():
    cache = ChunkKVCache(1, 1, 8, 10, torch.float32, "cpu")
    assert cache.allocate(4).tolist() == [0, 1, 2, 3]
    assert cache.allocate(6).tolist() == [4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match=r"pool is full: 10 \+ 1 rows > capacity 10"):
        cache.allocate(1)


def test_ragged_index_pads_and_records_each_rows_length():
    cache = ChunkKVCache(1, 1, 8, 10, torch.float32, "cpu")
    cache.set_index([torch.tensor([5, 1, 7]), torch.tensor([2])])
    assert cache.kv_index.dtype == cache.kv_len.dtype == torch.int32
    assert cache.kv_index.tolist() == [[5, 1, 7], [2, 0, 0]] and cache.kv_len.tolist() == [3, 1]


def test_a_view_reads_another_index_of_the_same_pool():
    cache = ChunkKVCache(1, 1, 8, 10, torch.float32, "cpu")
    cache.set_index([torch.arange(10)])
    cache.set_write_rows(torch.tensor([[8, 9]]))
    view = cache.view([torch.tensor([3, 4])])
    assert view.kv_index.tolist() == [[3, 4]] and view.write_rows is None
    assert cache.kv_index.shape == (1, 10) and cache.write_rows.tolist() == [[8, 9]]  # untouched
    view.k[0, 0, 3] = 1.0
    assert cache.k[0, 0, 3].eq(1.0).all()  # one pool: a view copies no storage


def test_ragged_batch_rows_attend_to_their_own_rows():
    torch.manual_seed(1)
    L, Hkv, H, D, Tq = 1, 1, 2, 8, 2
    cache = ChunkKVCache(L, Hkv, D, capacity=20, dtype=torch.float32, device="cpu")
    shared = cache.allocate(12)
    cache.store(shared, *torch.randn(2, L, Hkv, 12, D).unbind(0))
    blocks = [cache.allocate(Tq), cache.allocate(Tq)]
    reads = [torch.cat([shared[[0, 5, 6]], blocks[0]]), torch.cat([shared[[11, 2]], blocks[1]])]  # 5 and 4 rows
    cache.set_index(reads)
    cache.set_write_rows(torch.stack(blocks))
    q = torch.randn(2, H, Tq, D)
    k_blk, v_blk = torch.randn(2, 2, Hkv, Tq, D).unbind(0)
    out = cache.attend(0, q, k_blk, v_blk, backend="reference")
    for b, rows in enumerate(reads):  # each row alone, against exactly its keys
        keys, values = cache.k[0][:, rows][None], cache.v[0][:, rows][None]
        assert_close(out[b : b + 1], reference_attention(q[b : b + 1], keys, values)[0], dtype=torch.float32)


def test_attend_needs_write_rows_of_the_forwards_shape_and_no_mask():
    cache = ChunkKVCache(1, 1, 8, 10, torch.float32, "cpu")
    cache.set_index([cache.allocate(4)])
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match=r"set_write_rows\(\(B, Tq\) = \(1, 2\)\)"):
        cache.attend(0, q, k, k)
    cache.set_write_rows(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="an extra mask is not supported"):
        cache.attend(0, q, k, k, mask=torch.ones(1, 1, 2, 4, dtype=torch.bool))


# ---- DenseKVCache: Fast-dLLM's prefix/dual windows -------------------------------------------------

def test_dense_cache_block_step_equals_attention_over_the_whole_sequence():
    torch.manual_seed(2)
    L, B, Hkv, H, T, D = 2, 2, 2, 4, 12, 8
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :3] = False  # left padding of the second row
    cache = DenseKVCache(L, B, Hkv, T, D, torch.float32, "cpu", key_mask=pad)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    full = cache.window(0).attend(1, q, k, v, backend="reference")  # a refresh fills every row
    expected = reference_attention(q, k, v, pad[:, None, None, :])[0]
    assert_close(full, expected, dtype=torch.float32)
    # dual: the block [4, 8) alone against the cached rest; its rows are rewritten in place
    k2, v2 = torch.randn(B, Hkv, 4, D), torch.randn(B, Hkv, 4, D)
    block = cache.window(4).attend(1, q[:, :, 4:8], k2, v2, backend="reference")
    k[:, :, 4:8], v[:, :, 4:8] = k2, v2
    assert_close(block, reference_attention(q[:, :, 4:8], k, v, pad[:, None, None, :])[0], dtype=torch.float32)
    assert torch.equal(cache.k[1, :, :, 4:8], k2) and torch.equal(cache.k[0], torch.zeros_like(cache.k[0]))


def test_dense_cache_refuses_a_write_past_its_read_window():
    cache = DenseKVCache(1, 1, 1, 10, 8, torch.float32, "cpu")
    cache.window(6, read_end=8)
    q = k = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"tokens \[6, 10\) write past the cache's read window \[0, 8\)"):
        cache.attend(0, q, k, k)


def test_recorder_keeps_each_layers_kv_and_attends_plainly():
    rec = KVRecorder()
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    for layer in range(3):
        out = rec.attend(layer, q, k + layer, v, backend="reference")
    assert_close(out, reference_attention(q, k + 2, v)[0], dtype=torch.float32)
    ks, vs = rec.stacked()
    assert ks.shape == vs.shape == (3, 1, 2, 5, 8) and torch.equal(ks[1], k + 1)
