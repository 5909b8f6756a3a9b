"""Property tests of the per-key attention-mass kernel against pdllm.attention's reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from pdllm.attention import chunk_attention_reference, key_attention_mass_reference
from pdllm.testing import assert_close, tolerance
from pdllm.triton_kernels.attention_mass import key_attention_mass
from test_chunk_attention import CONFIGS, DEVICE, make_inputs, problems

def first_pass_lse(q, k_pool, index, kv_len):
    """lse of each query row over exactly the keys of ``index`` (what chunk_attention returns)."""
    return chunk_attention_reference(q, k_pool, k_pool, index, kv_len)[1]

@given(p=problems(), config=st.sampled_from(CONFIGS), scale=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_matches_reference(p, config, scale):
    note(f"problem={p} config={config} scale={scale}")
    q, k_pool, _, index, kv_len = make_inputs(p)
    lse = chunk_attention_reference(q, k_pool, k_pool, index, kv_len, scale)[1]
    mass = key_attention_mass(q, k_pool, index, kv_len, lse, scale=scale, config=config)
    ref = key_attention_mass_reference(q, k_pool, index, kv_len, lse, scale)
    assert mass.dtype == torch.float32 and mass.shape == (p["B"], p["H"], p["L"])
    assert not torch.isnan(mass).any()
    assert_close(mass, ref, dtype=q.dtype)
    for b, n in enumerate(p["lens"]):
        assert (mass[b, :, n:] == 0).all(), "entries past kv_len must be 0"

@given(p=problems())
def test_scores_sum_to_one_per_query_row(p):
    """With lse over exactly these keys each query row's probabilities sum to 1: mass sums to Tq."""
    q, k_pool, _, index, kv_len = make_inputs(p)
    mass = key_attention_mass(q, k_pool, index, kv_len, first_pass_lse(q, k_pool, index, kv_len))
    total = mass.sum(-1)  # (B, H)
    expected = torch.tensor([p["Tq"] if n > 0 else 0 for n in p["lens"]], dtype=torch.float32, device=DEVICE)
    atol, rtol = tolerance(q.dtype)
    torch.testing.assert_close(total, expected[:, None].expand_as(total), atol=atol * p["Tq"], rtol=rtol)

@given(p=problems(), data=st.data())
def test_lse_over_a_superset_gives_shares(p, data):
    """lse over all kv_len keys, mass over a prefix of them: the shares add up to less than Tq,
    and the prefix's mass plus the rest's mass is Tq."""
    q, k_pool, _, index, kv_len = make_inputs(p)
    lse = first_pass_lse(q, k_pool, index, kv_len)
    cut = torch.tensor([data.draw(st.integers(0, n)) for n in p["lens"]], dtype=torch.int32, device=DEVICE)
    head = key_attention_mass(q, k_pool, index, cut, lse)
    rest_index = index.clone()
    for b, (n, c) in enumerate(zip(p["lens"], cut.tolist())):
        rest_index[b, : n - c] = index[b, c:n]
        rest_index[b, n - c :] = -1
    rest = key_attention_mass(q, k_pool, rest_index, kv_len - cut, lse)
    atol, rtol = tolerance(q.dtype)
    full = torch.tensor([p["Tq"] if n > 0 else 0 for n in p["lens"]], dtype=torch.float32, device=DEVICE)
    assert (head.sum(-1) <= full[:, None] * (1 + rtol) + atol * p["Tq"]).all()
    torch.testing.assert_close(head.sum(-1) + rest.sum(-1), full[:, None].expand(p["B"], p["H"]),
                               atol=atol * p["Tq"], rtol=rtol)

def test_validation():
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    pool = torch.randn(1, 4, 16, device=DEVICE)
    index = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    kv_len = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="lse must be"):
        key_attention_mass(q, pool, index, kv_len, torch.zeros(1, 2, 4, device=DEVICE))
    with pytest.raises(TypeError, match="kv_index must be int32"):
        key_attention_mass(q, pool, index.long(), kv_len, torch.zeros(1, 2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        key_attention_mass(q, torch.randn(3, 4, 16, device=DEVICE), index, kv_len, torch.zeros(1, 2, 3, device=DEVICE))

@pytest.mark.gpu
def test_dispatch_through_pdllm_attention():
    from pdllm import attention

    q = torch.randn(1, 4, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    pool = torch.randn(2, 100, 64, device=DEVICE, dtype=torch.bfloat16)
    index = torch.randperm(100, device=DEVICE)[:60].int()[None]
    kv_len = torch.tensor([50], dtype=torch.int32, device=DEVICE)
    lse = attention.chunk_attention(q, pool, pool, index, kv_len)[1]
    mass = attention.key_attention_mass(q, pool, index, kv_len, lse)
    assert_close(mass, key_attention_mass_reference(q, pool, index, kv_len, lse), dtype=torch.bfloat16)
