"""Attention, in one place.

Every attention call in pdllm goes through this file:

* ``reference_attention``  plain PyTorch, fp32 accumulation, returns the log-sum-exp too.
  It is the ground truth every kernel and every fast path is tested against.
* ``sdpa_attention``       ``torch.nn.functional.scaled_dot_product_attention`` (the default).
* ``chunk_attention``      attention of a block of query rows over keys/values that live in a
  shared pool and are addressed through an index (the chunk KV cache of Prefilling-dLLM). On
  CUDA it runs the Triton split-KV kernel, elsewhere it gathers and calls the reference. This
  function is the one switch between kernel and reference.

Shapes (all functions): q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H % Hkv == 0 (GQA);
a pool is (Hkv, P, D) and is indexed by kv_index (B, L) int32 with kv_len (B,) valid entries.
Masks are boolean, True = may attend, broadcastable to (B, H, Tq, Tk).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "reference")


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> int:
    H, Hkv = q.shape[1], k.shape[1]
    if H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    return H // Hkv


def reference_attention(q, k, v, mask=None, scale=None):
    """Dense softmax attention computed in fp32. Returns (out in q.dtype, lse fp32 (B, H, Tq)).

    A query row with no key it may attend to gets out = 0 and lse = -inf (never NaN).
    """
    group = _check_heads(q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.float().repeat_interleave(group, dim=1)  # (B, H, Tk, D)
    v = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Tq)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    p = torch.nan_to_num(p, nan=0.0)  # rows with no allowed key
    out = torch.einsum("bhqk,bhkd->bhqd", p, v)
    return out.to(q.dtype), lse


def sdpa_attention(q, k, v, mask=None, scale=None):
    """PyTorch SDPA. Rows whose mask allows no key are zeroed instead of returning NaN."""
    group = _check_heads(q, k)
    if group > 1:  # enable_gqa exists, but the repeat keeps every SDPA backend eligible
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return out


def dense_attention(q, k, v, mask=None, backend: str = "sdpa"):
    """The model's attention call; ``backend`` picks the implementation (see BACKENDS)."""
    if backend == "sdpa":
        return sdpa_attention(q, k, v, mask)
    if backend == "reference":
        return reference_attention(q, k, v, mask)[0]
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------
# Attention over an indexed KV pool (the chunk cache). The reference gathers; the kernel does not.
# ---------------------------------------------------------------------------------------------


def gather_kv(pool: torch.Tensor, kv_index: torch.Tensor, kv_len: torch.Tensor):
    """Gather rows of a (Hkv, P, D) pool into (B, Hkv, L, D) plus a key mask (B, L)."""
    B, L = kv_index.shape
    key_mask = torch.arange(L, device=kv_index.device)[None, :] < kv_len[:, None].to(kv_index.device)
    idx = kv_index.long().clamp(0, pool.shape[1] - 1)  # padded entries point anywhere valid
    rows = pool[:, idx.reshape(-1)]  # (Hkv, B*L, D)
    return rows.view(pool.shape[0], B, L, pool.shape[2]).transpose(0, 1), key_mask


def chunk_attention_reference(q, k_pool, v_pool, kv_index, kv_len, scale=None):
    """Reference for the chunk-sparse kernel: gather, then dense fp32 attention."""
    k, key_mask = gather_kv(k_pool, kv_index, kv_len)
    v, _ = gather_kv(v_pool, kv_index, kv_len)
    return reference_attention(q, k, v, key_mask[:, None, None, :], scale)


def key_attention_mass_reference(q, k_pool, kv_index, kv_len, lse, scale=None):
    """Attention probability each key receives, summed over the query rows: (B, H, L) fp32.

    ``lse`` (B, H, Tq) is the log-sum-exp of the query rows over *all* keys they attend to,
    which may include keys outside ``kv_index``: the result is then each key's share of the
    full softmax, without materialising the full attention matrix.
    """
    group = _check_heads(q, k_pool[None])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, key_mask = gather_kv(k_pool, kv_index, kv_len)
    k = k.float().repeat_interleave(group, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k) * scale
    p = torch.exp(s - lse.float().unsqueeze(-1))
    p = p.masked_fill(~key_mask[:, None, None, :], 0.0)
    return p.sum(dim=2)


def _use_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda


def chunk_attention(q, k_pool, v_pool, kv_index, kv_len, scale=None):
    """Attention of q over pool rows ``kv_index[b, :kv_len[b]]``. Returns (out, lse)."""
    if _use_kernel(q):
        from pdllm.triton_kernels.chunk_attention import chunk_attention as kernel

        return kernel(q, k_pool, v_pool, kv_index, kv_len, scale=scale)
    return chunk_attention_reference(q, k_pool, v_pool, kv_index, kv_len, scale)


def key_attention_mass(q, k_pool, kv_index, kv_len, lse, scale=None):
    """Per-key attention mass (see the reference); Triton kernel on CUDA."""
    if _use_kernel(q):
        from pdllm.triton_kernels.attention_mass import key_attention_mass as kernel

        return kernel(q, k_pool, kv_index, kv_len, lse, scale=scale)
    return key_attention_mass_reference(q, k_pool, kv_index, kv_len, lse, scale)
