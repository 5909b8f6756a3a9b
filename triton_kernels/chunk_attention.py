"""Chunk-sparse attention over an indexed KV pool: a split-KV ("flash-decoding") Triton kernel.

What it computes (the reference is ``pdllm.attention.chunk_attention_reference``)::

    keys of batch row b  = k_pool[:, kv_index[b, :kv_len[b]]]        (no copy is made)
    out[b, h], lse[b, h] = softmax attention of q[b, h] over those keys (bidirectional)

Why a kernel: Prefilling-dLLM attends a block of ~32 query rows to a few selected 1K-token chunks
that live anywhere in a large KV pool. Gathering them first (index_select + SDPA) moves every
selected byte three times; this kernel reads each selected K/V row once, straight from the pool.

Why split-KV: with 32 query rows and one program per (batch row, KV head), an LLaDA-8B layer
launches only 32 programs for 132 SMs. Like flash-decoding, the logical key axis of each row is
cut into ``num_splits`` parts and each program computes a partial (out, lse) over its part
(``_attend_tile``, once per key tile). The parts are combined with their log-sum-exps by the
program of each (row, head) group that finishes last, in the same launch (``_combine_splits``):
every program writes its partial, then takes a ticket from a per-group counter (an atomic add);
the one that draws the last ticket reads the others' partials (still in L2) and writes the
result, so there is no second launch. With one split a program writes the final result directly.

The partial outputs are stored in the output's dtype (bf16 or fp16; fp32 stays fp32), their
log-sum-exps in fp32, as vLLM's paged attention v2 stores its partitions. Each partial is a
convex combination of value rows, so it fits the value's dtype, and storing it costs one rounding
at the output's own precision; publishing and gathering the partials ends every launch's critical
path, so half the bytes there is time saved.

Why groups: with GQA, all query heads that share one KV head sit in the same program (its rows
are group * Tq query rows), so every K/V tile is read from memory once per KV head, not per head.

Layout: q (B, H, Tq, D); k_pool, v_pool (Hkv, P, D), any strides (e.g. one layer of
ChunkKVCache's pool: (Hkv, P, D) views of row-major (P, Hkv, D) storage, where the programs of
all heads share DRAM pages); kv_index (B, L) int32 pool rows; kv_len (B,) int32 valid entries per
row. Entries of kv_index past kv_len are never read, so they may hold garbage.

On Hopper and newer GPUs the kernel is a programmatic dependent launch: it may start while the
kernel before it in the stream is still finishing, waits for it (``gdc_wait``) before its first
load, and lets the next launch start early in turn, which hides the launch gap and part of the
previous kernel's tail. Everything else is the same on every GPU.

Where a launch spends its time: ``chunk_attention(..., timestamps=buf)`` compiles the kernel with
per-program clock stamps (the ``TIMING`` branch; without it the stamps are not in the code at
all); benchmarks/probe_timeline.py reads them. Measured figures: benchmarks/results.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from pdllm.autotune.configs import get_config, rescale_splits

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): scores are kept in base 2 so the kernels can use exp2
LN2 = tl.constexpr(0.6931471805599453)  # ln(2), read inside the kernel: lse back to natural log

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Host-side arithmetic in plain Python: triton.cdiv is a @jit function, and calling it from
# Python costs microseconds per call on the launch path.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


# Per-program clock stamps of the TIMING branch, TIMESTAMP_SLOTS int64 per program:
# 0 start, 1 loop end, 2 after the split ticket, 3 end (ns, %globaltimer), 4 SM id, 5 ticket.
TIMESTAMP_SLOTS = tl.constexpr(6)


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k_base, v_base, idx, key_valid, offs_d, qk_scale,
                 stride_kp, stride_kd, stride_vp, stride_vd, DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax: the tile's keys are pool rows idx (BLOCK_N,) of which
    key_valid are real. Returns the updated (acc, l_i, m_i)."""
    # 1. K tile, gathered from the pool through the index (masked lanes never touch memory)
    k = tl.load(k_base + idx[:, None] * stride_kp + offs_d[None, :] * stride_kd, mask=key_valid[:, None], other=0.0)
    # 2. scores in base 2 (qk_scale holds log2(e)); padding keys get -inf
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(key_valid[None, :], s, float("-inf"))
    # 3. online softmax: new running max, rescale factor of what came before, this tile's weights.
    # Every tile holds at least one valid key, so m_new is finite and alpha is well defined
    # (exp2(-inf) = 0 on the first tile).
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # 4. V tile, and the weighted sum of its rows into the accumulator
    v = tl.load(v_base + idx[:, None] * stride_vp + offs_d[None, :] * stride_vd, mask=key_valid[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _combine_splits(OUT, LSE, O_PART, LSE_PART, row_off, lse_off, part_off, lse_part_off, row_valid, num_splits,
                    stride_ps, stride_qs, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """The last program of a group: out = sum_s w_s out_s with w_s = 2^(lse_s - lse) and
    lse = log2 sum_s 2^lse_s, over the partials every split of the group has published."""
    # 1. every split's weight first, from all their lse at once, so that the loop over the partial
    # outputs has no dependency between iterations and its loads pipeline (this combine ends the
    # kernel's critical path). Loads go through L2 (.cg), never a stale L1 line. A split without
    # keys has lse -inf and weight 0.
    offs_s = tl.arange(0, BLOCK_S)
    lse_all = tl.load(LSE_PART + offs_s[:, None] * stride_qs + lse_part_off[None, :],
                      mask=(offs_s[:, None] < num_splits) & row_valid[None, :], other=float("-inf"),
                      cache_modifier=".cg")  # (BLOCK_S, BLOCK_M)
    m_c = tl.max(lse_all, 0)
    m_safe = tl.where(m_c == float("-inf"), 0.0, m_c)  # no keys in any split: weights 0
    w_all = tl.exp2(lse_all - m_safe[None, :])
    l_c = tl.sum(w_all, 0)
    # 2. the weighted sum of the partial outputs
    acc_c = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for s in tl.range(0, num_splits, num_stages=3):
        w = tl.sum(tl.where(offs_s[:, None] == s, w_all, 0.0), 0)  # column s of w_all
        o_s = tl.load(O_PART + s * stride_ps + part_off, mask=row_valid[:, None], other=0.0,
                      cache_modifier=".cg").to(tl.float32)
        acc_c += o_s * w[:, None]
    # 3. normalise and store; a row without keys in any split gets out 0 and lse -inf
    has_any = l_c > 0.0
    l_c_safe = tl.where(has_any, l_c, 1.0)
    tl.store(OUT + row_off, (acc_c / l_c_safe[:, None]).to(OUT.dtype.element_ty), mask=row_valid[:, None])
    tl.store(LSE + lse_off, tl.where(has_any, (m_safe + tl.log2(l_c_safe)) * LN2, float("-inf")), mask=row_valid)


# Not specialised: the sizes and the strides that follow them (the index's, the LSEs' and their
# partials'), so that a new length or head count reuses the compiled kernel instead of compiling
# another for its divisibility by 16.
@triton.jit(do_not_specialize=["Hkv", "group", "Tq", "L", "num_splits", "stride_ib", "stride_lb", "stride_lh",
                               "stride_qs", "stride_qlb", "stride_qlh"])
def _chunk_attention_fwd(
    Q, K, V, KV_INDEX, KV_LEN, OUT, LSE,  # OUT (B, H, Tq, D), LSE (B, H, Tq): the results
    O_PART, LSE_PART, COUNTERS,  # with splits: (S, B, H, Tq, D) out's dtype, (S, B, H, Tq) fp32 base 2, one int32 per group
    TIMES,  # TIMING: (programs * TIMESTAMP_SLOTS,) int64 clock stamps; else None
    qk_scale,  # softmax scale * log2(e)
    Hkv, group, Tq, L, num_splits,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kh, stride_kp, stride_kd,
    stride_vh, stride_vp, stride_vd,
    stride_ib, stride_il,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh, stride_lt,
    stride_ps, stride_pb, stride_ph, stride_pt, stride_pd,
    stride_qs, stride_qlb, stride_qlh, stride_qlt,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows (of all heads of the group) per program
    BLOCK_N: tl.constexpr,  # keys per tile of the loop
    SPLIT: tl.constexpr,  # num_splits > 1: write a partial, the last program of the group combines
    BLOCK_S: tl.constexpr,  # next power of two >= num_splits
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), ignored for fp16/bf16
    PDL: tl.constexpr,  # launched as a programmatic dependent launch (Hopper and newer)
    TIMING: tl.constexpr,  # write per-program clock stamps to TIMES (benchmarks/probe_timeline.py)
):
    if PDL:
        # The launch may start while the previous kernel in the stream still runs (its tail, and
        # the launch latency, overlap our start). Wait for it before the first load: it may have
        # written q, the pool or the index. Then let the next launch start early in turn.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_s = tl.program_id(0)  # which split of the key axis
    pid_bh = tl.program_id(1)  # (batch row, KV head)
    pid_m = tl.program_id(2)  # which block of the group's query rows
    if TIMING:
        t_start = tl.extra.cuda.globaltimer()
        stamps = TIMES + ((pid_bh * tl.num_programs(2) + pid_m) * tl.num_programs(0) + pid_s) * TIMESTAMP_SLOTS
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv

    # Row r of the program is query t = r % Tq of head hkv * group + r // Tq.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < group * Tq
    h = hkv * group + rows // Tq
    t = rows % Tq
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)

    # This program's part of the row's keys: split s owns index entries [lo, lo + keys_per_split)
    # of the index width L, tiles starting on BLOCK_N boundaries, cut short at the row's kv_len.
    # The split is cut from L (known at launch), not from kv_len (in memory), so that the first
    # index load below need not wait for kv_len: the two loads are in flight together. A row
    # shorter than L leaves its last splits empty, which costs nothing, as the row of length L
    # sets the launch's duration. Whole tiles per split keep every tile's loads full-width.
    keys_per_split = tl.cdiv(tl.cdiv(L, num_splits), BLOCK_N) * BLOCK_N
    lo = pid_s * keys_per_split
    n = tl.minimum(tl.maximum(tl.load(KV_LEN + b), 0), L)
    hi = tl.minimum(lo + keys_per_split, n)

    k_base = K + hkv.to(tl.int64) * stride_kh
    v_base = V + hkv.to(tl.int64) * stride_vh
    idx_base = KV_INDEX + b.to(tl.int64) * stride_ib

    # Online softmax state, in base 2: running max m_i, running sum l_i, unnormalised acc.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # The index of the next tile is loaded one iteration ahead, so the K/V addresses of a tile
    # are known without waiting on a load in the same iteration: Triton's software pipeliner
    # then multi-buffers K and V (num_stages - 1 tiles in flight) instead of spending one stage
    # on the index -> K dependency. Masked lanes never touch memory, so padding entries past
    # kv_len (garbage, -1, huge) are never dereferenced.
    offs_first = lo + tl.arange(0, BLOCK_N)
    idx_next = tl.load(idx_base + offs_first * stride_il, mask=offs_first < tl.minimum(lo + keys_per_split, L), other=0)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_valid = offs_n < hi
        idx = idx_next.to(tl.int64)
        offs_after = offs_n + BLOCK_N
        idx_next = tl.load(idx_base + offs_after * stride_il, mask=offs_after < hi, other=0)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_base, v_base, idx, key_valid, offs_d, qk_scale,
                                     stride_kp, stride_kd, stride_vp, stride_vd, DOT_PRECISION)

    if TIMING:  # the stamp depends on l_i, so that it is not hoisted above the loop
        tl.store(stamps + 1, tl.extra.cuda.globaltimer() + (tl.sum(l_i) > 1e30).to(tl.int64))
        tl.store(stamps + 0, t_start)
        tl.store(stamps + 4, tl.extra.cuda.smid().to(tl.int64))
    # A split (or a whole row) without keys has l_i = 0: out 0 and lse -inf, never NaN.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))  # base 2
    row_off = b * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :] * stride_od
    lse_off = b * stride_lb + h * stride_lh + t * stride_lt
    if not SPLIT:
        tl.store(OUT + row_off, out.to(OUT.dtype.element_ty), mask=row_valid[:, None])
        tl.store(LSE + lse_off, lse2 * LN2, mask=row_valid)
        if TIMING:
            tl.store(stamps + 3, tl.extra.cuda.globaltimer())
    else:
        part_off = b * stride_pb + h[:, None] * stride_ph + t[:, None] * stride_pt + offs_d[None, :] * stride_pd
        lse_part_off = b * stride_qlb + h * stride_qlh + t * stride_qlt
        tl.store(O_PART + pid_s * stride_ps + part_off, out.to(O_PART.dtype.element_ty), mask=row_valid[:, None])
        tl.store(LSE_PART + pid_s * stride_qs + lse_part_off, lse2, mask=row_valid)
        # Publish the partial, then take a ticket. The barrier orders every thread's stores before
        # the release of the one thread that does the atomic; the acquire makes the partials
        # of the programs with earlier tickets visible to the one with the last.
        tl.debug_barrier()
        counter = COUNTERS + pid_bh * tl.num_programs(2) + pid_m
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if TIMING:
            tl.store(stamps + 2, tl.extra.cuda.globaltimer() + (ticket > 1000000).to(tl.int64))
            tl.store(stamps + 5, ticket.to(tl.int64))
        if ticket == num_splits - 1:  # every other split of this group is done: combine them
            tl.store(counter, 0)  # ready for the next launch (and for CUDA-graph replays)
            _combine_splits(OUT, LSE, O_PART, LSE_PART, row_off, lse_off, part_off, lse_part_off, row_valid,
                            num_splits, stride_ps, stride_qs, BLOCK_M, HEAD_DIM, BLOCK_S)
            if TIMING:
                tl.store(stamps + 3, tl.extra.cuda.globaltimer())


# ---------------------------------------------------------------------------------------------
# Python side: validation, launch configuration, launch.
# ---------------------------------------------------------------------------------------------


def _check_inputs(q, k_pool, v_pool, kv_index, kv_len, v_name="v_pool"):
    """One clear error for each way the inputs can be wrong. Returns (B, H, Tq, D, Hkv, P, L)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, Tq, D), got shape {tuple(q.shape)}")
    if k_pool.dim() != 3:
        raise ValueError(f"k_pool must be (Hkv, P, D), got shape {tuple(k_pool.shape)}")
    if v_pool is not None and v_pool.shape != k_pool.shape:
        raise ValueError(f"{v_name} must have the shape of k_pool {tuple(k_pool.shape)}, got {tuple(v_pool.shape)}")
    if kv_index.dim() != 2:
        raise ValueError(f"kv_index must be (B, L), got shape {tuple(kv_index.shape)}")
    if kv_len.dim() != 1:
        raise ValueError(f"kv_len must be (B,), got shape {tuple(kv_len.shape)}")
    B, H, Tq, D = q.shape
    Hkv, P, Dk = k_pool.shape
    if kv_index.shape[0] != B or kv_len.shape[0] != B:
        raise ValueError(f"batch mismatch: q has {B} rows, kv_index {kv_index.shape[0]}, kv_len {kv_len.shape[0]}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q has {D}, k_pool has {Dk}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if k_pool.dtype != q.dtype or (v_pool is not None and v_pool.dtype != q.dtype):
        vd = v_pool.dtype if v_pool is not None else None
        raise TypeError(f"dtype mismatch: q {q.dtype}, k_pool {k_pool.dtype}, {v_name} {vd}")
    if kv_index.dtype != torch.int32:
        raise TypeError(f"kv_index must be int32, got {kv_index.dtype}")
    if kv_len.dtype != torch.int32:
        raise TypeError(f"kv_len must be int32, got {kv_len.dtype}")
    tensors = {"q": q, "k_pool": k_pool, "kv_index": kv_index, "kv_len": kv_len}
    if v_pool is not None:
        tensors[v_name] = v_pool
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
    return B, H, Tq, D, Hkv, P, kv_index.shape[1]


def bytes_moved(q: torch.Tensor, k_pool: torch.Tensor, kv_index: torch.Tensor) -> int:
    """The bytes any implementation of one call must move: the selected K and V rows of every KV
    head, q read and out written. Benchmarks and the tuner report rates against it."""
    elem = q.element_size()
    Hkv, D = k_pool.shape[0], k_pool.shape[-1]
    return kv_index.numel() * Hkv * D * 2 * elem + 2 * q.numel() * elem


def block_m_for(rows: int) -> int:
    """Query rows per program: the group's rows rounded up to a power of two, 16 to 128."""
    return max(16, min(128, next_pow2(max(rows, 1))))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits are enough to exercise the combine


def default_num_splits(base_programs: int, L: int, block_n: int, sms: int) -> int:
    """Splits so that the launch is one wave of one program per SM, but each split keeps at least
    four key tiles (shorter loops spend their time in the pipeline's prologue) and never more
    splits than tiles. One per SM, not two: the loop is bound by memory, so a second program on
    an SM brings no more bandwidth, and it doubles the partials to combine."""
    tiles = cdiv(max(L, 1), block_n)
    want = sms // max(base_programs, 1)
    return max(1, min(want, cdiv(tiles, 4), 64))


def shared_memory_bytes(block_m: int, block_n: int, head_dim: int, num_stages: int, elem_bytes: int) -> int:
    """What one program of the kernel asks of shared memory: (num_stages - 1) pipelined K and V
    tiles, the Q tile, and P (S after softmax) twice for its layout change before the PV dot.
    Checked against Triton's own figure on an H100 (bf16 and fp32, head_dim 128)."""
    kv = (num_stages - 1) * 2 * block_n * head_dim
    return elem_bytes * (kv + block_m * head_dim + 2 * block_m * block_n)


def max_shared_memory(device: torch.device) -> int | None:
    """The per-program shared memory limit of this GPU (None in the interpreter: no limit)."""
    if device.type != "cuda":
        return None
    return _max_shared_memory(device.index or 0)


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: CUDA, compute capability 9.0+ and a Triton that has it."""
    return device.type == "cuda" and _pdl_capable(device.index or 0)


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0) and hasattr(tl.extra.cuda, "gdc_wait")


@functools.lru_cache(maxsize=None)
def _max_shared_memory(index: int) -> int:  # asked once per GPU, not at every launch
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def fit_shared_memory(cfg: dict, block_m: int, head_dim: int, elem_bytes: int, limit: int | None) -> dict:
    """Shrink a config until one program fits in shared memory: fewer stages first, then smaller
    key tiles. A tuned bucket can be the nearest one to a call with more query rows (a larger
    BLOCK_M) or a wider dtype (fp32) than it was tuned for, and its config would not launch."""
    cfg = dict(cfg)
    while limit is not None and shared_memory_bytes(block_m, cfg["BLOCK_N"], head_dim, cfg["num_stages"],
                                                    elem_bytes) > limit:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        else:
            break
    return cfg


def launch_config(q, Hkv, L, config=None, num_splits=None):
    """Resolve BLOCK_N, num_warps, num_stages, num_splits (explicit > tuned table > defaults).
    A split count from the table is rescaled to this call's programs (rescale_splits); one given
    (num_splits, or config's) is used as given, as the tuner and the tests mean it."""
    B, H, Tq, D = q.shape
    group = H // Hkv
    block_m = block_m_for(group * Tq)
    base = B * Hkv * cdiv(group * Tq, block_m)
    cfg = dict(get_config("chunk_attention", q.device, kv_len=L, q_rows=Tq, head_dim=D, group=group, dtype=q.dtype))
    # The table's config may come from a bucket with fewer rows or a narrower dtype: fit it. An
    # explicit config is taken as given (the tuner must see a misfit fail, not time another one).
    cfg = fit_shared_memory(cfg, block_m, D, q.element_size(), max_shared_memory(q.device))
    if cfg.get("num_splits") is not None:
        cfg["num_splits"] = rescale_splits(int(cfg["num_splits"]), cfg.get("base_programs"), base)
    if config:
        cfg.update(config)
    if num_splits is not None:
        cfg["num_splits"] = num_splits
    splits = cfg.get("num_splits")
    if splits is None:
        splits = default_num_splits(base, L, cfg["BLOCK_N"], num_sms(q.device))
    cfg["num_splits"] = max(1, min(int(splits), cdiv(max(L, 1), cfg["BLOCK_N"])))
    cfg["BLOCK_M"] = block_m
    return cfg


_COUNTERS: dict[tuple, torch.Tensor] = {}


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """The int32 ticket counters of the split combine, all 0 between launches (the last program
    of each group resets its own). One buffer per (device, stream): launches on one stream run one
    after another, so they can share it; two streams get two buffers. Grown, never shrunk."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def chunk_attention(q, k_pool, v_pool, kv_index, kv_len, scale=None, num_splits=None, config=None,
                    timestamps=None):
    """Attention of q (B, H, Tq, D) over pool rows ``kv_index[b, :kv_len[b]]``.

    Returns (out in q.dtype (B, H, Tq, D), lse fp32 (B, H, Tq), natural log). A row with no keys
    gets out 0 and lse -inf. ``config`` may set BLOCK_N, num_warps, num_stages, num_splits; what
    it leaves out comes from the tuned table of this GPU (pdllm.autotune.configs) or defaults.
    ``timestamps`` (a diagnostic, CUDA only): an int64 tensor of at least programs *
    TIMESTAMP_SLOTS entries, programs = num_splits * B * Hkv * row blocks, that receives every
    program's clock stamps (see TIMESTAMP_SLOTS; benchmarks/probe_timeline.py reads them).
    """
    B, H, Tq, D, Hkv, P, L = _check_inputs(q, k_pool, v_pool, kv_index, kv_len)
    group = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    cfg = launch_config(q, Hkv, L, config, num_splits)
    S, block_m = cfg["num_splits"], cfg["BLOCK_M"]
    grid = (S, B * Hkv, cdiv(group * Tq, block_m))
    if S > 1:  # partial results, combined in the kernel by the last split of each group
        o_part = torch.empty((S, B, H, Tq, D), dtype=q.dtype, device=q.device)
        lse_part = torch.empty((S, B, H, Tq), dtype=torch.float32, device=q.device)
        counters = split_counters(q.device, grid[1] * grid[2])
    else:  # never read: the kernel writes out and lse directly
        o_part, lse_part, counters = out[None], lse[None], kv_len
    # launch_pdl is a launch option, not a kernel argument: passed only where the GPU has it.
    pdl = {"PDL": True, "launch_pdl": True} if use_pdl(q.device) else {"PDL": False}
    _chunk_attention_fwd[grid](
        q, k_pool, v_pool, kv_index, kv_len, out, lse,
        o_part, lse_part, counters, timestamps,
        scale * LOG2E.value,
        Hkv, group, Tq, L, S,
        *q.stride(),
        *k_pool.stride(),
        *v_pool.stride(),
        *kv_index.stride(),
        *out.stride(),
        *lse.stride(),
        *o_part.stride(),
        *lse_part.stride(),
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], SPLIT=S > 1, BLOCK_S=next_pow2(S),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", TIMING=timestamps is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl,
    )
    return out, lse
