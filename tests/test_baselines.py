"""The baselines (dLLM-Cache, DyLLM): exact against vanilla when they recompute everything, the
recomputation rules checked against direct computations, knob errors, and default runs."""

import pytest
import torch
import torch.nn.functional as F

from pdllm.attention import dense_attention
from pdllm.baselines.dllm_cache import DllmCache
from pdllm.baselines.dyllm import DyLLM
from pdllm.methods import make_method
from pdllm.sampler import GenerationConfig, Vanilla, generate, make_batch
from pdllm.testing import assert_close, random_prompts

GC = GenerationConfig(gen_length=16, block_length=8, steps=8)


def run(model, method, batch, gc=GC, trace=None):
    """generate() with `method`, recording every forward's input tokens and logits (and trace(method))."""
    xs, logits, traces = [], [], []
    inner = method.block_logits

    def recording(model, x, start, end, step):
        xs.append(x.clone())
        logits.append(inner(model, x, start, end, step))
        if trace is not None:
            traces.append(trace(method))
        return logits[-1]

    method.block_logits = recording  # the instance attribute shadows the class's method
    return generate(model, batch, gc, method=method), xs, logits, traces


@torch.no_grad()
def layer0(model, x, batch_pos, key_mask):
    """Layer 0 computed directly from the tokens: (normed input, v (B, T, Hkv*D), context (B, T, H*D))."""
    blk = model.blocks[0]
    h = blk.attn_norm(model.tok_emb(x))
    q, k, v = blk.attn.qkv(h, model.rope(batch_pos))
    mask = None if key_mask is None else key_mask[:, None, None, :]
    ctx = dense_attention(q, k, v, mask, model.attention_backend)
    return h, v.transpose(1, 2).flatten(2), ctx.transpose(1, 2).flatten(2)


EXACT = [
    pytest.param(DllmCache, dict(prompt_interval=1, response_interval=1, rho=0.25), id="dllm_cache-refresh-every-step"),
    pytest.param(DllmCache, dict(prompt_interval=1, response_interval=5, rho=1.0), id="dllm_cache-rho-1"),
    pytest.param(DyLLM, dict(num_full_steps=0, tau=1.0, full_query_interval=1), id="dyllm-tau-1"),
    pytest.param(DyLLM, dict(num_full_steps=100), id="dyllm-all-full"),
]


@pytest.mark.parametrize("model_name", ["llada", "dream"])
@pytest.mark.parametrize("cls, kwargs", EXACT)
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_recomputing_everything_equals_vanilla(model_name, cls, kwargs, threshold, request):
    model = request.getfixturevalue(model_name)
    gc = GenerationConfig(gen_length=16, block_length=8, steps=8, threshold=threshold)
    batch = random_prompts(model.cfg.vocab_size)  # padded: lengths 13, 7, 10
    ref, _, ref_logits, _ = run(model, Vanilla(), batch, gc)
    out, _, logits, _ = run(model, cls(**kwargs), batch, gc)
    assert torch.equal(out.tokens, ref.tokens)
    assert out.nfe == ref.nfe == len(logits)
    for f, (a, b) in enumerate(zip(logits, ref_logits)):
        assert_close(a, b, msg=f"forward {f}")
    if cls is DllmCache or kwargs.get("num_full_steps", 0) >= out.nfe:
        assert out.stats["recomputed_fraction"] == 1.0
    # (with tau=1, DyLLM skips only rows whose context is bitwise unchanged: saturated softmax rows)


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_dllm_cache_recomputes_the_rows_the_rule_says(model_name, request):
    model = request.getfixturevalue(model_name)
    batch = random_prompts(model.cfg.vocab_size)
    B, P, n, rho = len(batch), max(map(len, batch)), GC.gen_length, 0.25
    T, k, L = P + n, int(rho * n), model.cfg.n_layers
    method = DllmCache(prompt_interval=3, response_interval=2, rho=rho)
    out, xs, _, rows = run(model, method, batch, trace=lambda m: [r.clone() for r in m.last_rows])
    # forward f (1-based): prompt refresh iff (f-1) % 3 == 0, response refresh iff (f-1) % 2 == 0
    expected = []
    for f in range(1, len(xs) + 1):
        p, r = (f - 1) % 3 == 0, (f - 1) % 2 == 0
        expected.append([B * ((P if p else 0) + (n if r else k))] * L)
    assert {(e[0]) for e in expected} == {B * T, B * n, B * (P + k), B * k}  # all four cases occur
    assert out.stats["recomputed_rows"] == expected
    assert out.stats["recomputed_fraction"] == pytest.approx(sum(map(sum, expected)) / (len(xs) * L * B * T))
    assert out.stats["prompt_refreshes"] == 3 and out.stats["response_refreshes"] == 4
    # V-verify at layer 0, where the input is the embedding: the picked rows are the k whose V moved most
    # (compared by value: unchanged [MASK] rows tie at similarity 1)
    for f in range(2, len(xs) + 1):
        if (f - 1) % 2 == 0:
            continue
        _, v_old, _ = layer0(model, xs[f - 2], method.batch.pos, method.batch.key_mask)
        _, v_new, _ = layer0(model, xs[f - 1], method.batch.pos, method.batch.key_mask)
        sim = F.cosine_similarity(v_new[:, P:], v_old[:, P:], dim=-1)
        picked = rows[f - 1][0][:, -k:] - P  # the V-verify rows come after any prompt rows
        assert_close(sim.gather(1, picked).sort(1).values, sim.sort(1).values[:, :k])


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_dyllm_salient_rows_are_those_whose_context_moved(model_name, request):
    model = request.getfixturevalue(model_name)
    batch = random_prompts(model.cfg.vocab_size)
    B, P, L = len(batch), max(map(len, batch)), model.cfg.n_layers
    T, full = P + GC.gen_length, 2
    # the first sparse forward follows `full` dense ones, which are vanilla: take its inputs from vanilla
    _, xs, _, _ = run(model, Vanilla(), batch)
    layout = make_batch(model, batch, GC, model.cfg.eos_id)
    pos, key_mask = layout.pos, layout.key_mask
    _, _, ctx_old = layer0(model, xs[full - 1], pos, key_mask)
    _, _, ctx_new = layer0(model, xs[full], pos, key_mask)
    sim = F.cosine_similarity(ctx_new.double(), ctx_old.double(), dim=-1).flatten().sort().values
    gaps = sim[1:] - sim[:-1]
    i = len(sim) // 4 + int(gaps[len(sim) // 4: 3 * len(sim) // 4].argmax())  # a clear gap mid-distribution
    tau = float(sim[i] + sim[i + 1]) / 2
    assert 0 < tau < 1 and gaps[i] > 1e-5
    expected = F.cosine_similarity(ctx_new.double(), ctx_old.double(), dim=-1) < tau
    assert 0 < expected.sum() < B * T

    method = DyLLM(num_full_steps=full, tau=tau, full_query_interval=1)
    out, xs2, _, salient = run(model, method, batch, trace=lambda m: [s.clone() for s in m.last_salient])
    assert all(torch.equal(a, b) for a, b in zip(xs2[: full + 1], xs[: full + 1]))
    assert torch.equal(salient[full][0], expected)
    counts = out.stats["recomputed_rows"]
    assert counts[:full] == [[B * T] * L] * full and out.stats["dense_forwards"] == full
    assert counts[full][0] == int(expected.sum())
    assert all(c == [int(s.sum()) for s in ss] for c, ss in zip(counts, salient))
    assert out.stats["recomputed_fraction"] == pytest.approx(sum(map(sum, counts)) / (len(counts) * L * B * T))


def test_dyllm_queries_only_the_response_between_full_queries(llada):
    batch = random_prompts(llada.cfg.vocab_size)
    P = max(map(len, batch))
    method = DyLLM(num_full_steps=1, tau=0.999, full_query_interval=2)
    out, xs, _, salient = run(llada, method, batch, trace=lambda m: [s.clone() for s in m.last_salient])
    for processed, layers in enumerate(salient):
        if processed > 2 and processed % 2:
            assert not any(s[:, :P].any() for s in layers), processed
    assert any(s[:, :P].any() for s in salient[4])  # whole-sequence forwards do refresh prompt rows
    assert (out.tokens != llada.cfg.mask_id).all()


@pytest.mark.parametrize("make, message", [
    (lambda: DllmCache(rho=0.0), "rho=0.0"),
    (lambda: DllmCache(rho=1.5), "rho=1.5"),
    (lambda: DllmCache(prompt_interval=0), "prompt_interval=0"),
    (lambda: DllmCache(response_interval=0), "response_interval=0"),
    (lambda: DllmCache(response_interval=2.5), "response_interval=2.5"),
    (lambda: make_method("dllm_cache", rho=-1), "rho=-1"),
    (lambda: DyLLM(tau=0.0), "tau=0.0"),
    (lambda: DyLLM(tau=1.01), "tau=1.01"),
    (lambda: DyLLM(num_full_steps=-1), "num_full_steps=-1"),
    (lambda: DyLLM(full_query_interval=0), "full_query_interval=0"),
    (lambda: make_method("dyllm", tau=2), "tau=2"),
])
def test_invalid_knobs(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("model_name", ["llada", "dream"])
@pytest.mark.parametrize("method", ["dllm_cache", "dyllm"])
def test_default_knobs_run_to_fully_unmasked_output(model_name, method, request):
    model = request.getfixturevalue(model_name)
    gc = GenerationConfig(gen_length=32, block_length=8, steps=32)  # long enough for the sparse paths
    transferred = []
    out = generate(model, random_prompts(model.cfg.vocab_size), gc, method=method,
                   callback=lambda event: transferred.append(int(event["transfer"].sum())))
    assert out.tokens.shape == (3, 32) and sum(transferred) == 3 * 32  # every position decoded once
    if model_name == "llada":  # the tiny Dream (and vanilla with it) at times predicts its own mask id
        assert (out.tokens != model.cfg.mask_id).all()
    assert out.nfe == 32 and len(out.stats["recomputed_rows"]) == 32
    assert 0 < out.stats["recomputed_fraction"] < 1


@pytest.mark.parametrize("method", ["dllm_cache", "dyllm"])
def test_padded_batch_equals_each_row_alone(llada, method):
    """Both pick rows by ranking floats (cosine similarities), and a padded batch computes each
    row's hidden states only to the last bits of the row alone (other matmul and softmax shapes):
    in fp32 a near-tie between two rows can then flip with the BLAS at hand. In fp64 the ranks are
    those of the maths, so this checks that rows are picked per row and padding is masked."""
    gc = GenerationConfig(gen_length=16, block_length=8, steps=16)
    batch = random_prompts(llada.cfg.vocab_size, lengths=(13, 5, 9))
    llada.to(torch.float64)
    try:
        together = generate(llada, batch, gc, method=method).tokens
        for row, p in enumerate(batch):
            assert torch.equal(generate(llada, [p], gc, method=method).tokens[0], together[row])
    finally:
        llada.to(torch.float32)
