"""Property tests of the chunk-sparse split-KV kernel against pdllm.attention's reference.

On CPU the kernel runs in the Triton interpreter (profile `ci`: small shapes, fp32/fp16); on a GPU
natively (profile `gpu`: larger shapes, bf16 too, 10 examples per property, their kernel variants
from VARIANTS; `thorough`: 1000, every parameter drawn freely).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from pdllm.attention import chunk_attention_reference, reference_attention
from pdllm.testing import HAS_CUDA, HYPOTHESIS_PROFILE, assert_close
from pdllm.triton_kernels.chunk_attention import chunk_attention

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.float16]
HEAD_DIMS = [64, 128] if HAS_CUDA else [16, 32]
GROUPS = [1, 2, 4, 7] if HAS_CUDA else [1, 2, 3]
MAX_KV_HEADS = 4 if HAS_CUDA else 2
MAX_BATCH = 4 if HAS_CUDA else 2
MAX_POOL = 700 if HAS_CUDA else 160
# Launch configs drawn by the main property (None: the tuned table / defaults).
# On CPU small tiles make short rows span several tiles and splits. On the GPU every extra config
# is ~70 more compiled variants; other tile shapes are checked there by the tuner, candidate by
# candidate, against the same reference.
CONFIGS = [None] if HAS_CUDA else [None, {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
                                 {"BLOCK_N": 16, "num_warps": 2, "num_stages": 1}]
PADDING = {"minus_one": -1, "huge": 2**31 - 1, "negative_huge": -(2**31)}

# On a GPU each kernel variant costs Triton seconds to compile. A variant is
# fixed by the dtype, head_dim, BLOCK_M (the query rows of a KV head's group: group x Tq), the
# tuned table's BLOCK_N, warps and stages (looked up by Tq, group, head_dim, dtype and the index
# width) and the split count (SPLIT, BLOCK_S); batch, heads, lengths, pool, index, padding and
# strides are not in it. Drawn freely, nearly every example of every property compiles a variant
# of its own (51 in the `gpu` profile on the H200). There the properties draw the variant from this
# one list instead, which every property shares: bf16 and fp32 (exact dot), head_dim 128 and 64,
# BLOCK_M 16, 32 and 128, one split, 2 and 3-4. `thorough` draws every parameter freely (fp16, BLOCK_M 64).
#   (dtype, head_dim, group, Tq range, splits)
VARIANTS = [
    (torch.bfloat16, 128, 1, (17, 32), 2),  # BLOCK_M 32: LLaDA's decode shape
    (torch.bfloat16, 64, 4, (17, 32), 2),  # BLOCK_M 128
    (torch.float32, 128, 7, (1, 2), 4),  # BLOCK_M 16
]
SHARED_VARIANTS = HAS_CUDA and HYPOTHESIS_PROFILE == "gpu"


@st.composite
def problems(draw, splits=st.none()):
    """A random problem: shapes, ragged lengths (0 and 1 included), index subsets in any order,
    and the split count to launch with (``splits``; the variant's under SHARED_VARIANTS)."""
    B = draw(st.integers(1, MAX_BATCH))
    Hkv = draw(st.integers(1, MAX_KV_HEADS))
    if SHARED_VARIANTS:
        dtype, D, group, (t_min, t_max), n_splits = draw(st.sampled_from(VARIANTS))
        Tq = draw(st.integers(t_min, t_max))
    else:
        dtype, D = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(HEAD_DIMS))
        group, Tq, n_splits = draw(st.sampled_from(GROUPS)), draw(st.integers(1, 40)), draw(splits)
    P = draw(st.integers(1, MAX_POOL))
    L = draw(st.integers(0, P))  # width of the index table
    len_st = st.one_of(st.just(0), st.just(min(1, L)), st.just(L), st.integers(0, L))
    lens = draw(st.lists(len_st, min_size=B, max_size=B))
    return dict(
        B=B, Hkv=Hkv, H=group * Hkv, Tq=Tq, D=D, P=P, L=L, lens=lens, dtype=dtype, splits=n_splits,
        padding=draw(st.sampled_from(sorted(PADDING))),
        layers=draw(st.sampled_from([1, 3])),  # 3: the pool is one layer of a (3, Hkv, P, D) cache
        sharp=draw(st.sampled_from([1.0, 4.0])),  # 4: peaked softmax
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(p):
    g = torch.Generator(device=DEVICE).manual_seed(p["seed"])
    dt, kw = p["dtype"], dict(generator=g, device=DEVICE)
    q = (torch.randn(p["B"], p["H"], p["Tq"], p["D"], **kw) * p["sharp"]).to(dt)
    cache = torch.randn(2, p["layers"], p["Hkv"], p["P"], p["D"], **kw).to(dt)
    layer = p["layers"] // 2
    k_pool, v_pool = cache[0, layer], cache[1, layer]  # strided views when layers > 1
    index = torch.stack([torch.randperm(p["P"], **kw)[: p["L"]] for _ in range(p["B"])]).to(torch.int32)
    index = index.reshape(p["B"], p["L"])
    kv_len = torch.tensor(p["lens"], dtype=torch.int32, device=DEVICE)
    for b, n in enumerate(p["lens"]):
        index[b, n:] = PADDING[p["padding"]]  # must never be read
    return q, k_pool, v_pool, index, kv_len


def check_against_reference(out, lse, q, k_pool, v_pool, index, kv_len, scale=None):
    ref_out, ref_lse = chunk_attention_reference(q, k_pool, v_pool, index, kv_len, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close(out, ref_out, dtype=q.dtype, msg="out")
    # lse is fp32 arithmetic on the same (exactly representable) products: fp32 tolerance.
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows without keys must have lse -inf, the others finite"
    assert_close(torch.where(empty, 0.0, lse), torch.where(empty, 0.0, ref_lse), dtype=torch.float32, msg="lse")
    assert (out[empty.nonzero(as_tuple=True)] == 0).all(), "rows without keys must be 0"


@given(p=problems(splits=st.one_of(st.none(), st.integers(1, 9))), config=st.sampled_from(CONFIGS),
       scale=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_matches_reference(p, config, scale):
    note(f"problem={p} config={config} scale={scale}")
    q, k_pool, v_pool, index, kv_len = make_inputs(p)
    out, lse = chunk_attention(q, k_pool, v_pool, index, kv_len, scale=scale, num_splits=p["splits"], config=config)
    check_against_reference(out, lse, q, k_pool, v_pool, index, kv_len, scale)


@given(p=problems(), data=st.data())
def test_key_order_does_not_matter(p, data):
    q, k_pool, v_pool, index, kv_len = make_inputs(p)
    perm_index = index.clone()
    g = torch.Generator(device=DEVICE).manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    for b, n in enumerate(p["lens"]):
        perm_index[b, :n] = index[b, :n][torch.randperm(n, generator=g, device=DEVICE)]
    out1, lse1 = chunk_attention(q, k_pool, v_pool, index, kv_len, num_splits=p["splits"])
    out2, lse2 = chunk_attention(q, k_pool, v_pool, perm_index, kv_len, num_splits=p["splits"])
    assert_close(out2, out1, dtype=q.dtype)
    assert torch.equal(torch.isinf(lse1), torch.isinf(lse2))
    assert_close(lse2.nan_to_num(neginf=0.0), lse1.nan_to_num(neginf=0.0), dtype=torch.float32)


@given(p=problems(splits=st.integers(2, 16)))
def test_split_count_does_not_change_result(p):
    q, k_pool, v_pool, index, kv_len = make_inputs(p)
    out1, lse1 = chunk_attention(q, k_pool, v_pool, index, kv_len, num_splits=1)
    outs, lses = chunk_attention(q, k_pool, v_pool, index, kv_len, num_splits=p["splits"])
    assert_close(outs, out1, dtype=q.dtype)
    assert_close(lses.nan_to_num(neginf=0.0), lse1.nan_to_num(neginf=0.0), dtype=torch.float32)


@given(p=problems(splits=st.integers(2, 8)))
def test_split_combine_leaves_its_counters_at_zero(p):
    """The last split of each group combines the partials and resets the group's ticket counter,
    so back-to-back launches (and CUDA-graph replays) see a clean counter and agree bit for bit."""
    from pdllm.triton_kernels.chunk_attention import split_counters

    q, k_pool, v_pool, index, kv_len = make_inputs(p)
    out1, lse1 = chunk_attention(q, k_pool, v_pool, index, kv_len, num_splits=p["splits"])
    out2, lse2 = chunk_attention(q, k_pool, v_pool, index, kv_len, num_splits=p["splits"])
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    assert (split_counters(q.device, 1) == 0).all()


@given(p=problems(splits=st.one_of(st.none(), st.integers(1, 8))))
def test_whole_pool_equals_dense_attention(p):
    """Selecting every pool row (in pool order) is plain dense attention over the pool."""
    q, k_pool, v_pool, _, _ = make_inputs(p)
    B, P = p["B"], p["P"]
    index = torch.arange(P, dtype=torch.int32, device=DEVICE).expand(B, P).contiguous()
    kv_len = torch.full((B,), P, dtype=torch.int32, device=DEVICE)
    out, lse = chunk_attention(q, k_pool, v_pool, index, kv_len, num_splits=p["splits"])
    k = k_pool.unsqueeze(0).expand(B, -1, -1, -1)
    v = v_pool.unsqueeze(0).expand(B, -1, -1, -1)
    ref_out, ref_lse = reference_attention(q, k, v)
    assert_close(out, ref_out, dtype=q.dtype)
    assert_close(lse, ref_lse, dtype=torch.float32)


def test_llada_shape_and_empty_rows():
    """One fixed, realistic case (32 heads, D 128, Tq 32), with a row of kv_len 0 and one of 1."""
    torch.manual_seed(0)
    dt = torch.float16
    B, H, Tq, D, P = 3, 4 if not HAS_CUDA else 32, 32, 128, 300
    q = torch.randn(B, H, Tq, D, dtype=dt, device=DEVICE)
    k_pool = torch.randn(H, P, D, dtype=dt, device=DEVICE)
    v_pool = torch.randn(H, P, D, dtype=dt, device=DEVICE)
    index = torch.randint(0, P, (B, 200), dtype=torch.int32, device=DEVICE)
    kv_len = torch.tensor([200, 0, 1], dtype=torch.int32, device=DEVICE)
    index[1:, 1:] = -1
    for splits in (None, 1, 3):
        out, lse = chunk_attention(q, k_pool, v_pool, index, kv_len, num_splits=splits)
        check_against_reference(out, lse, q, k_pool, v_pool, index, kv_len)
        assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
        # One key: the output is that key's value row, for every query.
        assert_close(out[2], v_pool[:, index[2, 0].long()][:, None, :].expand(H, Tq, D), dtype=dt)


def test_empty_shapes():
    q = torch.randn(2, 2, 0, 16, device=DEVICE)
    pool = torch.randn(1, 5, 16, device=DEVICE)
    index = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    kv_len = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    out, lse = chunk_attention(q, pool, pool, index, kv_len)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)
    q = torch.randn(2, 2, 3, 16, device=DEVICE)
    out, lse = chunk_attention(q, pool, pool, index[:, :0], kv_len)  # L = 0
    assert (out == 0).all() and torch.isneginf(lse).all()


def _valid():
    q = torch.randn(2, 4, 3, 16, device=DEVICE)
    pool = torch.randn(2, 10, 16, device=DEVICE)
    index = torch.zeros(2, 5, dtype=torch.int32, device=DEVICE)
    kv_len = torch.tensor([5, 2], dtype=torch.int32, device=DEVICE)
    return dict(q=q, k_pool=pool, v_pool=pool.clone(), kv_index=index, kv_len=kv_len)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must be"),
        (lambda a: a.update(k_pool=a["k_pool"][None]), ValueError, "k_pool must be"),
        (lambda a: a.update(v_pool=a["v_pool"][:, :4]), ValueError, "v_pool must have the shape"),
        (lambda a: a.update(kv_index=a["kv_index"][0]), ValueError, "kv_index must be"),
        (lambda a: a.update(kv_len=a["kv_len"][None]), ValueError, "kv_len must be"),
        (lambda a: a.update(kv_len=a["kv_len"][:1]), ValueError, "batch mismatch"),
        (lambda a: a.update(q=a["q"][..., :8].contiguous()), ValueError, "head_dim mismatch"),
        (lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple of key/value heads"),
        (lambda a: a.update(q=a["q"].half()), TypeError, "dtype mismatch"),
        (lambda a: a.update(q=a["q"].double(), k_pool=a["k_pool"].double()), TypeError, "q dtype must be"),
        (lambda a: a.update(kv_index=a["kv_index"].long()), TypeError, "kv_index must be int32"),
        (lambda a: a.update(kv_len=a["kv_len"].long()), TypeError, "kv_len must be int32"),
        (lambda a: a.update(q=torch.randn(2, 4, 3, 24, device=DEVICE), k_pool=torch.randn(2, 10, 24, device=DEVICE),
                            v_pool=torch.randn(2, 10, 24, device=DEVICE)), ValueError, "power of two"),
    ],
)
def test_input_validation(change, error, match):
    args = _valid()
    change(args)
    with pytest.raises(error, match=match):
        chunk_attention(**args)


@pytest.mark.gpu
def test_device_mismatch():
    args = _valid()
    args["kv_len"] = args["kv_len"].cpu()
    with pytest.raises(ValueError, match="one device"):
        chunk_attention(**args)


def test_dispatch_through_pdllm_attention():
    """pdllm.attention.chunk_attention picks the kernel on CUDA and the reference elsewhere."""
    from pdllm import attention

    a = _valid()
    out, lse = attention.chunk_attention(a["q"], a["k_pool"], a["v_pool"], a["kv_index"], a["kv_len"])
    ref_out, ref_lse = chunk_attention_reference(a["q"], a["k_pool"], a["v_pool"], a["kv_index"], a["kv_len"])
    assert_close(out, ref_out)
    assert math.isfinite(lse.sum().item())


def test_configs_shrink_to_fit_shared_memory():
    """A tuned config met by a call with more query rows or fp32 must still launch (H100: 227 KiB)."""
    from pdllm.triton_kernels.chunk_attention import fit_shared_memory, max_shared_memory, shared_memory_bytes

    h100 = 232448
    # the two launches that failed on the H100 before this check (Triton's figures: 294912, 409728 bytes)
    assert shared_memory_bytes(128, 128, 128, 4, 2) == 294912
    assert shared_memory_bytes(16, 128, 128, 4, 4) >= 409728
    tuned = {"BLOCK_N": 128, "num_warps": 8, "num_stages": 4, "num_splits": 1}
    assert fit_shared_memory(tuned, 32, 128, 2, h100) == tuned  # fits as tuned: untouched
    for block_m, elem in ((128, 2), (16, 4), (128, 4)):
        fitted = fit_shared_memory(tuned, block_m, 128, elem, h100)
        assert shared_memory_bytes(block_m, fitted["BLOCK_N"], 128, fitted["num_stages"], elem) <= h100
        assert fitted["num_warps"] == 8 and fitted["num_splits"] == 1
    assert fit_shared_memory(tuned, 128, 128, 4, None) == tuned  # the interpreter: no limit
    assert max_shared_memory(torch.device("cpu")) is None


def test_timeline_probe_reads_the_kernels_stamp_slots():
    # benchmarks/probe_timeline.py runs the kernel's TIMING branch; it names the same slots.
    import importlib.util
    from pathlib import Path

    from pdllm.triton_kernels.chunk_attention import TIMESTAMP_SLOTS

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_timeline.py"
    spec = importlib.util.spec_from_file_location("probe_timeline", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.TICKET == TIMESTAMP_SLOTS.value - 1


@pytest.mark.gpu
def test_timing_branch_stamps_every_program_and_changes_nothing():
    from pdllm.triton_kernels.chunk_attention import TIMESTAMP_SLOTS, launch_config

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 32, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 3000, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    index = torch.randperm(3000, device="cuda", generator=g)[:2048].int()[None]
    kv_len = torch.tensor([2048], dtype=torch.int32, device="cuda")
    cfg = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "num_splits": 4}
    splits = launch_config(q, 2, 2048, cfg)["num_splits"]
    grid_rows = splits * 2  # splits x KV heads, one block of the group's 128 query rows
    stamps = torch.zeros(grid_rows * TIMESTAMP_SLOTS.value, dtype=torch.int64, device="cuda")
    timed = chunk_attention(q, k, v, index, kv_len, config=cfg, timestamps=stamps)
    plain = chunk_attention(q, k, v, index, kv_len, config=cfg)
    assert_close(timed[0], plain[0], dtype=torch.bfloat16)  # the stamps change no arithmetic
    assert_close(timed[1], plain[1], dtype=torch.float32)
    s = stamps.view(grid_rows, TIMESTAMP_SLOTS.value).cpu()
    start, loop_end, ticket_at, end, ticket = s[:, 0], s[:, 1], s[:, 2], s[:, 3], s[:, 5]
    assert (start > 0).all() and (loop_end >= start).all() and (ticket_at >= loop_end).all()
    assert sorted(ticket.tolist()) == sorted(list(range(splits)) * 2)  # each KV head's splits drew one ticket each
    last = ticket == splits - 1
    assert (end[last] >= ticket_at[last]).all()


def test_programmatic_dependent_launch_only_where_the_gpu_has_it():
    """PDL needs CUDA and compute capability 9.0+: the interpreter and older GPUs launch plainly."""
    from pdllm.triton_kernels.chunk_attention import use_pdl

    assert use_pdl(torch.device("cpu")) is False
    if HAS_CUDA:
        major, _ = torch.cuda.get_device_capability()
        assert use_pdl(torch.device("cuda")) == (major >= 9 and hasattr(__import__("triton").language.extra.cuda,
                                                                         "gdc_wait"))
