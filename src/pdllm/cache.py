"""KV caches: which K/V rows a layer's attention reads, and where a forward writes its own.

A cache is any object with ``attend(layer, q, k, v, mask, backend) -> out``: the model hands it the
new tokens' q (B, H, Tq, D) and k, v (B, Hkv, Tq, D) (k already rotated), the cache stores k, v
where they belong and returns the attention output (B, H, Tq, D) over everything it holds.

* ``DenseKVCache``  one contiguous buffer per layer over the whole sequence (prompt + generation).
  A forward writes its tokens' rows in place and reads the prefix [0, read_end): running the
  whole sequence fills it (a refresh), running one block against it is Fast-dLLM's dual cache,
  running the block and everything after it is the prefix cache.
* ``ChunkKVCache``  Prefilling-dLLM's layout: one pool of rows per layer holding prefix, chunks,
  query and generated tokens, and a token index per batch row saying which pool rows it reads.
  The Triton kernel reads the index directly; nothing is gathered into a contiguous copy.
"""

from __future__ import annotations

import copy

import torch

from pdllm.attention import chunk_attention, chunk_attention_reference, dense_attention


class DenseKVCache:
    def __init__(self, n_layers, batch, n_kv_heads, length, head_dim, dtype, device, key_mask=None):
        shape = (n_layers, batch, n_kv_heads, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = key_mask  # (B, length) bool, False = padding; None = no padding
        self.write_start, self.read_end = 0, length

    @classmethod
    def for_model(cls, model, batch: int, length: int, key_mask=None):
        c = model.cfg
        return cls(c.n_layers, batch, c.n_kv_heads, length, c.head_dim, model.dtype, model.device, key_mask)

    def window(self, write_start: int, read_end: int | None = None) -> "DenseKVCache":
        """The next forward's tokens are rows [write_start, write_start + T); it reads [0, read_end)."""
        self.write_start = write_start
        self.read_end = self.k.shape[3] if read_end is None else read_end
        return self

    def attend(self, layer, q, k, v, mask=None, backend="sdpa"):
        s, e = self.write_start, self.write_start + q.shape[2]
        if e > self.read_end:
            raise ValueError(f"tokens [{s}, {e}) write past the cache's read window [0, {self.read_end})")
        self.k[layer, :, :, s:e] = k
        self.v[layer, :, :, s:e] = v
        keys, values = self.k[layer, :, :, : self.read_end], self.v[layer, :, :, : self.read_end]
        if self.key_mask is not None:
            pad = self.key_mask[:, None, None, : self.read_end]
            mask = pad if mask is None else mask & pad
        return dense_attention(q, keys, values, mask, backend)


class ChunkKVCache:
    """A pool of K/V rows per layer, (L, Hkv, P, D), read through a per-row token index.

    Rows are appended in segments (prefix, each chunk, query, generation region); a batch row
    reads ``kv_index[b, :kv_len[b]]``. The rows that the current forward's tokens occupy are set
    with ``set_write_rows``: their K/V are overwritten in place each step, so a decode step
    allocates nothing.

    Memory layout: the pool is stored row-major, (L, P, Hkv, D), and ``k``/``v`` are its
    (L, Hkv, P, D) views. A pool row then holds every head's K (Hkv * D contiguous), and the
    attention programs of all heads, which read the same selected rows at the same time, share
    DRAM pages (benchmarks/probe_pool_layout.py measures the two layouts).
    """

    def __init__(self, n_layers, n_kv_heads, head_dim, capacity, dtype, device):
        shape = (n_layers, capacity, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device).transpose(1, 2)  # (L, Hkv, P, D) view
        self.v = torch.zeros(shape, dtype=dtype, device=device).transpose(1, 2)
        self.used = 0  # pool rows handed out so far
        self.kv_index: torch.Tensor | None = None  # (B, L) int32
        self.kv_len: torch.Tensor | None = None  # (B,) int32
        self.write_rows: torch.Tensor | None = None  # (B, Tq) int64: pool rows of the forward's tokens

    @classmethod
    def for_model(cls, model, capacity: int):
        c = model.cfg
        return cls(c.n_layers, c.n_kv_heads, c.head_dim, capacity, model.dtype, model.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def allocate(self, n: int) -> torch.Tensor:
        """Hand out n fresh pool rows; returns their indices (n,) int64."""
        if self.used + n > self.capacity:
            raise ValueError(f"chunk KV pool is full: {self.used} + {n} rows > capacity {self.capacity}")
        rows = torch.arange(self.used, self.used + n, device=self.k.device)
        self.used += n
        return rows

    def store(self, rows: torch.Tensor, k_layers, v_layers):
        """Write every layer's K/V (L, Hkv, n, D) (e.g. from a KVRecorder) into pool rows (n,)."""
        self.k[:, :, rows] = k_layers.to(self.k.dtype)
        self.v[:, :, rows] = v_layers.to(self.v.dtype)

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write one layer's k, v (B, Hkv, T, D) into pool rows (B * T,), in row order.

        One row copy per tensor into the row-major storage, (P, Hkv, D): k's (B, T, Hkv, D) view
        is how the fused projection laid it out, so nothing is transposed on the way."""
        B, Hkv, T, D = k.shape
        self.k[layer].transpose(0, 1).index_copy_(0, rows, k.transpose(1, 2).reshape(B * T, Hkv, D))
        self.v[layer].transpose(0, 1).index_copy_(0, rows, v.transpose(1, 2).reshape(B * T, Hkv, D))

    def set_index(self, rows_per_batch: list[torch.Tensor]):
        """Row b of the batch reads pool rows rows_per_batch[b] (any order, any length)."""
        lengths = [len(r) for r in rows_per_batch]
        index = torch.zeros(len(rows_per_batch), max(lengths), dtype=torch.int32, device=self.k.device)
        for b, r in enumerate(rows_per_batch):
            index[b, : len(r)] = r.to(torch.int32)
        self.kv_index = index
        self.kv_len = torch.tensor(lengths, dtype=torch.int32, device=self.k.device)

    def view(self, rows_per_batch: list[torch.Tensor]) -> "ChunkKVCache":
        """The same pool read through another index (e.g. one request of a batch)."""
        other = copy.copy(self)
        other.set_index(rows_per_batch)
        other.write_rows = None
        return other

    def set_write_rows(self, rows: torch.Tensor):
        """The next forward's tokens (B, Tq) live in these pool rows (they must be in the index)."""
        self.write_rows = rows.long()

    def attend(self, layer, q, k, v, mask=None, backend="sdpa"):
        if mask is not None:
            raise ValueError("ChunkKVCache selects keys through its index; an extra mask is not supported")
        B, Hkv, Tq, D = k.shape
        if self.write_rows is None or tuple(self.write_rows.shape) != (B, Tq):
            raise ValueError(f"set_write_rows((B, Tq) = {(B, Tq)}) before running a forward against the chunk cache")
        self.write(layer, self.write_rows.reshape(-1), k, v)
        attend = chunk_attention_reference if backend == "reference" else chunk_attention
        out, _ = attend(q, self.k[layer], self.v[layer], self.kv_index, self.kv_len)
        return out


class KVRecorder:
    """Plain self-attention that also keeps each layer's K/V: the way to encode a segment once.

    After a forward, ``k[layer]`` and ``v[layer]`` are (B, Hkv, T, D); ``stacked()`` returns them as
    (L, B, Hkv, T, D).
    """

    def __init__(self):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def attend(self, layer, q, k, v, mask=None, backend="sdpa"):
        self.k.append(k)
        self.v.append(v)
        return dense_attention(q, k, v, mask, backend)

    def stacked(self):
        return torch.stack(self.k), torch.stack(self.v)
