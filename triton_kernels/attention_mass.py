"""Attention mass per key, without materialising the attention matrix.

    mass[b, h, j] = sum_i exp(q[b, h, i] . k_j * scale - lse[b, h, i]),   k_j = k_pool[:, kv_index[b, j]]

``lse`` comes from a first attention pass (``chunk_attention`` returns it). If that pass saw more
keys than ``kv_index`` holds, each value is the key's share of the full softmax, summed over the
query rows. Chunk scoring sums it over a chunk's keys; SnapKV-style token selection keeps the keys
with the most mass. Entries past kv_len are 0. Reference: ``pdllm.attention.key_attention_mass_reference``.

Grid: one program per (tile of BLOCK_N keys, batch row, KV head). A program reads its K tile from
the pool once and loops over the query heads of its GQA group and their query rows, so K is read
once per KV head and nothing of size Tq x L is ever stored.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pdllm.autotune.configs import get_config
from pdllm.triton_kernels.chunk_attention import LOG2E, _check_inputs, cdiv, next_pow2

DEFAULT_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@triton.jit(do_not_specialize=["Hkv", "group", "Tq", "L", "stride_ib", "stride_lb", "stride_lh", "stride_mb", "stride_mh"])
def _key_attention_mass(
    Q, K, KV_INDEX, KV_LEN, LSE, MASS,
    qk_scale,  # softmax scale * log2(e)
    Hkv, group, Tq, L,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kh, stride_kp, stride_kd,
    stride_ib, stride_il,
    stride_lb, stride_lh, stride_lt,
    stride_mb, stride_mh, stride_ml,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step
    BLOCK_N: tl.constexpr,  # keys per program
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv

    n = tl.minimum(tl.maximum(tl.load(KV_LEN + b), 0), L)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_valid = offs_n < n
    offs_d = tl.arange(0, HEAD_DIM)
    # Padding entries past kv_len are masked and never dereferenced.
    idx = tl.load(KV_INDEX + b.to(tl.int64) * stride_ib + offs_n * stride_il, mask=key_valid, other=0).to(tl.int64)
    k = tl.load(
        K + hkv.to(tl.int64) * stride_kh + idx[:, None] * stride_kp + offs_d[None, :] * stride_kd,
        mask=key_valid[:, None], other=0.0,
    )
    # Tiles past kv_len do no work: their query loop is empty and they store zeros.
    rows = tl.where(pid_n * BLOCK_N < n, Tq, 0)

    for g in range(group):
        h = hkv * group + g
        mass = tl.zeros([BLOCK_N], dtype=tl.float32)
        for m0 in range(0, rows, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_valid = offs_m < Tq
            q = tl.load(
                Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None], other=0.0,
            )
            # Rows past Tq get lse = +inf, so they add exp2(-inf) = 0.
            lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m * stride_lt, mask=row_valid, other=float("inf"))
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None] * LOG2E)
            mass += tl.sum(p, 0)
        mass = tl.where(key_valid, mass, 0.0)
        tl.store(MASS + b * stride_mb + h * stride_mh + offs_n * stride_ml, mass, mask=offs_n < L)


def key_attention_mass(q, k_pool, kv_index, kv_len, lse, scale=None, config=None):
    """Attention mass of each key summed over the query rows: (B, H, L) fp32 (see module doc).

    ``lse`` (B, H, Tq) is the natural-log log-sum-exp of each query row over all keys it attends
    to. ``config`` may set BLOCK_N, num_warps, num_stages; the rest comes from the tuned table
    of this GPU (pdllm.autotune.configs) or defaults.
    """
    B, H, Tq, D, Hkv, P, L = _check_inputs(q, k_pool, None, kv_index, kv_len)
    if lse.shape != (B, H, Tq):
        raise ValueError(f"lse must be (B, H, Tq) = {(B, H, Tq)}, got {tuple(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse must be on {q.device}, got {lse.device}")
    if not lse.dtype.is_floating_point:
        raise TypeError(f"lse must be a floating-point tensor, got {lse.dtype}")
    lse = lse.float()
    group = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    mass = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if mass.numel() == 0:
        return mass

    cfg = dict(get_config("key_attention_mass", q.device, kv_len=L, q_rows=Tq, head_dim=D, group=group, dtype=q.dtype))
    if config:
        cfg.update(config)
    block_m = max(16, min(64, next_pow2(Tq)))
    grid = (cdiv(L, cfg["BLOCK_N"]), B * Hkv)
    _key_attention_mass[grid](
        q, k_pool, kv_index, kv_len, lse, mass,
        scale * LOG2E.value,
        Hkv, group, Tq, L,
        *q.stride(),
        *k_pool.stride(),
        *kv_index.stride(),
        *lse.stride(),
        *mass.stride(),
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return mass
