"""prefill.py: Prefilling-dLLM is the dense model with fewer chunks, and each step of the method."""

import gc
import math
import warnings
import weakref

import pytest
import torch

from pdllm.attention import reference_attention
from pdllm.cache import KVRecorder
from pdllm.methods import make_method
from pdllm.prefill import CHUNKERS, Chunked, Prefill, PrefillConfig, build_layout
from pdllm.prefill.draft import draft_answers, score_requests_draft
from pdllm.prefill.scorers import AttentionProbe, pool_tokens
from pdllm.prefill.selectors import keep_tokens, select_chunks
from pdllm.sampler import GenerationConfig, generate
from pdllm.testing import StepRecorder, assert_close
from pdllm.tokenizer import LongContextPrompt


def chunked(prompt, chunk_size, bos_id, chunking="bos_added") -> Chunked:
    """A request cut by a registered chunker: its spans and chunk rows."""
    return Chunked.of(prompt, CHUNKERS[chunking](chunk_size)(prompt, bos_id), bos_id)


def split_chunks(context, chunk_size, bos_id, chunking="bos_added"):
    """The chunk rows of a bare context."""
    return chunked(LongContextPrompt([], context, []), chunk_size, bos_id, chunking).chunks


def attention_scores(model, prompt, chunk_size, slots=0, **knobs):
    """One request's attention scores (``slots`` answer rows scored with the query)."""
    scorer = PrefillConfig(chunk_size=chunk_size, **knobs).stage("score")
    return scorer(model, [chunked(prompt, chunk_size, model.cfg.bos_id)], block_length=slots)[0]


def draft_scores(model, prompt, chunk_size, draft, scored=None, **knobs):
    """One request's draft scores for a given draft (``scored``: the slots read, default all)."""
    scorer = PrefillConfig(chunk_size=chunk_size, score="draft", **knobs).stage("score")
    scored = [True] * len(draft) if scored is None else scored
    return score_requests_draft(model, [chunked(prompt, chunk_size, model.cfg.bos_id)], [(draft, scored)], scorer)[0]


def draft_answer(model, prompt, **knobs):
    return draft_answers(model, [prompt], PrefillConfig(score="draft", **knobs).stage("score"))[0]


def request_of(model, context_len=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, model.cfg.vocab_size - 20, (n,), generator=g).tolist()  # noqa: E731
    return LongContextPrompt(prefix=[model.cfg.bos_id] + ids(5), context=ids(context_len), query=ids(6))


# ---- the proof: sparse with everything selected == dense --------------------------------------

DENSE_EQUIVALENT = dict(chunk_size=8, top_k=100, chunk_bos=False, positions="absolute", cache_mode="full_prompt_mask",
                        chunking="bos_added")  # contiguous chunks that do not overlap


@pytest.mark.parametrize("model_name", ["llada", "dream"])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_all_chunks_no_bos_absolute_full_prompt_equals_dense_dual_cache(model_name, threshold, request):
    model = request.getfixturevalue(model_name)
    batch = [request_of(model, 45, seed=0), request_of(model, 30, seed=1)]
    gc = GenerationConfig(gen_length=16, block_length=8, steps=16, threshold=threshold)
    for req in batch:
        dense, sparse = StepRecorder(make_method("dual")), StepRecorder(Prefill(**DENSE_EQUIVALENT))
        d = generate(model, [req], gc, method=dense)
        s = generate(model, [req], gc, method=sparse)
        assert torch.equal(s.tokens, d.tokens)
        assert len(dense.logits) == len(sparse.logits) == d.nfe
        for a, b in zip(sparse.logits, dense.logits):
            assert_close(a, b, torch.float32)
    # a batch of requests of different lengths: per-row chunk tables, same answers
    together = generate(model, batch, gc, method="prefill", **DENSE_EQUIVALENT)
    alone = [generate(model, [req], gc, method="dual").tokens[0] for req in batch]
    assert torch.equal(together.tokens, torch.stack(alone))


def test_chunk_query_with_everything_selected_decodes(llada):
    out = generate(llada, [request_of(llada)], GenerationConfig(gen_length=8, block_length=8, steps=8),
                   method="prefill", chunk_size=8, top_k=100, cache_mode="chunk_query")
    assert (out.tokens != llada.cfg.mask_id).all() and out.stats["kv_rows"][0] > 45


def test_the_trained_length_warning_counts_the_positions_a_method_runs_at(llada, monkeypatch):
    """A 200-token request on a model trained at 64 positions: the dense cache runs all 200 of them
    (warned), prefill with 2 chunks of 8 kept places prefix + 18 rows + query + answer (not warned)."""
    from pdllm import sampler

    monkeypatch.setattr(llada.cfg, "max_positions", 64)
    req, gc = request_of(llada, context_len=180), GenerationConfig(gen_length=8, block_length=8, steps=8)
    for method, knobs, warns in (("prefill", dict(chunk_size=8, top_k=2, chunking="bos_added"), False), ("dual", {}, True)):
        monkeypatch.setattr(sampler, "_warned", set())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate(llada, [req], gc, method=method, **knobs)
        messages = [str(w.message) for w in caught if "positions the model was trained on" in str(w.message)]
        assert bool(messages) == warns, (method, messages)
    assert messages[0].startswith("dual places this request's tokens at 200 positions (prompt 192 + answer 8 tokens)")


# ---- 1. chunking -------------------------------------------------------------------------------

def test_chunk_boundaries_and_bos_placement():
    ctx = list(range(10, 33))  # 23 tokens
    chunks = split_chunks(ctx, 8, bos_id=1)
    assert [len(c) for c in chunks] == [9, 9, 8]  # BOS + 8, BOS + 8, BOS + the short rest
    assert all(c[0] == 1 for c in chunks)
    assert sum((c[1:] for c in chunks), []) == ctx  # nothing lost, nothing repeated
    assert split_chunks(ctx, 8, bos_id=None)[2] == ctx[16:]
    assert split_chunks(ctx, 100, bos_id=1) == [[1] + ctx]
    with pytest.raises(ValueError, match="empty context"):
        split_chunks([], 8, 1)
    with pytest.raises(ValueError, match="chunk_size=0"):
        PrefillConfig(chunk_size=0)
    spans = chunked(LongContextPrompt([], ctx, []), 8, 1).spans  # the data every later step reads
    assert [(s.start, s.end, s.bos, s.rows) for s in spans] == [(0, 8, True, 9), (8, 16, True, 9), (16, 23, True, 8)]


def test_overlapping_chunks_reach_into_their_neighbours():
    prompt = LongContextPrompt([], list(range(10, 33)), [])  # 23 tokens
    spans = PrefillConfig(chunk_size=8, chunking="overlap", chunk_overlap=2).stage("chunking")(prompt, 1)
    assert [(s.start, s.end, s.bos) for s in spans] == [(0, 10, True), (6, 18, True), (14, 23, True)]
    assert Chunked.of(prompt, spans, 1).chunks[1] == [1] + prompt.context[6:18]
    with pytest.raises(ValueError, match="chunk_overlap=-1"):
        PrefillConfig(chunking="overlap", chunk_overlap=-1)


def test_snapped_chunks_cut_at_sentence_ends_and_fall_back_to_fixed_offsets_without_breaks():
    from pdllm.boundaries import SENTENCE

    def cut(n, ends, window=5):
        breaks = [0] * n
        for t in ends:
            breaks[t] = SENTENCE  # a sentence ends after token t: a cut at t + 1
        chunker = PrefillConfig(chunk_size=16, chunking="snapped", snap_window=window).stage("chunking")
        return [(s.start, s.end) for s in chunker(LongContextPrompt([], list(range(n)), [], breaks), 1)]

    assert cut(40, [12, 29]) == [(0, 13), (13, 30), (30, 40)]  # each cut moved to the sentence end near it
    assert cut(40, [3, 24]) == [(0, 16), (16, 32), (32, 40)]  # ends out of reach: the fixed offsets
    assert cut(34, [12]) == [(0, 13), (13, 34)]  # a 2-token sliver at the end joins the chunk before it
    assert cut(40, [12, 29], window=0) == [(0, 16), (16, 32), (32, 40)]
    chunker = PrefillConfig(chunk_size=16, chunking="snapped").stage("chunking")
    fixed = chunker(LongContextPrompt([], list(range(40)), []), 1)  # ids alone: no breaks to snap to
    assert [(s.start, s.end) for s in fixed] == [(0, 16), (16, 32), (32, 40)]
    with pytest.raises(ValueError, match="snap_window=8"):
        PrefillConfig(chunk_size=16, chunking="snapped", snap_window=8)


def test_keep_margin_widens_the_selected_chunks_and_merges_those_that_meet(llada):
    from pdllm.prefill.selectors import widen

    r = chunked(LongContextPrompt([9], list(range(10, 50)), [7]), 8, 1)  # 40 tokens: 5 chunks
    w = widen(r, [1, 2, 4], 3, 1)
    assert [(s.start, s.end, s.bos) for s in w.spans] == [(5, 27, True), (29, 40, True)]
    assert w.chunks[0] == [1] + list(range(15, 37))
    with pytest.raises(ValueError, match="keep_margin needs positions"):
        PrefillConfig(keep_margin=4, positions="absolute")
    gc = GenerationConfig(gen_length=4, block_length=4, steps=4)
    req = request_of(llada, 45)
    for cache_mode in ("full_prompt_mask", "chunk_query"):
        plain = Prefill(chunk_size=8, top_k=2, cache_mode=cache_mode, chunking="bos_added")
        wide = Prefill(chunk_size=8, top_k=2, keep_margin=3, cache_mode=cache_mode, chunking="bos_added")
        generate(llada, [req], gc, method=plain)
        out = generate(llada, [req], gc, method=wide)
        assert wide.selected == plain.selected and (out.tokens != llada.cfg.mask_id).all()
        expected = widen(chunked(req, 8, llada.cfg.bos_id), plain.selected[0], 3, llada.cfg.bos_id).spans
        assert wide.kept_spans[0] == expected
        assert out.stats["kv_rows"][0] == len(req.prefix) + sum(s.rows for s in expected) + len(req.query) + 4


# ---- 2. scoring --------------------------------------------------------------------------------

def explicit_attention_scores(model, prompt, chunks, layers, kernel):
    """The same scores from the explicit softmax matrix of each chunk's forward (no kernels)."""
    P, Q = len(prompt.prefix), len(prompt.query)
    out = []
    for c in chunks:
        seq = torch.tensor([prompt.prefix + c + prompt.query])
        rec = KVRecorder()
        qs = []

        class Q_(KVRecorder):
            def attend(self, layer, q, k, v, mask=None, backend="sdpa"):
                qs.append(q)
                return rec.attend(layer, q, k, v, mask, backend)

        model(seq, torch.arange(seq.shape[1])[None], cache=Q_())
        per_layer = []
        for layer in layers:
            q, k = qs[layer], rec.k[layer]
            group = q.shape[1] // k.shape[1]
            s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(group, 1)) / math.sqrt(q.shape[-1])
            probs = s.softmax(-1)[:, :, P + len(c):, P:P + len(c)]  # query rows -> chunk keys
            per_layer.append(pool_tokens(probs.sum(2), kernel).sum(1)[0])
        out.append(torch.stack(per_layer).mean(0).mean())
    return torch.stack(out)


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_streamed_attention_scores_equal_the_full_attention_matrix(model_name, request):
    model = request.getfixturevalue(model_name)
    prompt = request_of(model, 45)
    chunks = split_chunks(prompt.context, 8, model.cfg.bos_id)
    expected = explicit_attention_scores(model, prompt, chunks, range(model.cfg.n_layers - 2, model.cfg.n_layers), 7)
    assert_close(attention_scores(model, prompt, 8, score_layers=2, score_batch=3), expected, torch.float32)


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_early_exit_scores_read_the_layers_at_or_below_the_depth_and_run_no_later_one(model_name, request):
    model = request.getfixturevalue(model_name)  # 2 layers: depth 1 reads layer 0 and never runs layer 1
    prompt = request_of(model, 45)
    chunks = split_chunks(prompt.context, 8, model.cfg.bos_id)
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, b in enumerate(model.blocks)]
    hooks.append(model.norm_f.register_forward_hook(lambda m, i, o: ran.append("norm_f")))
    try:
        scores = attention_scores(model, prompt, 8, score_depth=1, score_batch=3)
    finally:
        for h in hooks:
            h.remove()
    assert set(ran) == {0}  # no later block, no final norm (nor head)
    assert_close(scores, explicit_attention_scores(model, prompt, chunks, range(0, 1), 7), torch.float32)
    full_depth = attention_scores(model, prompt, 8, score_depth=2, score_layers=1)
    assert_close(full_depth, explicit_attention_scores(model, prompt, chunks, range(1, 2), 7), torch.float32)
    with pytest.raises(ValueError, match="score_depth=3 is deeper than the model"):
        attention_scores(model, prompt, 8, score_depth=3)
    with pytest.raises(ValueError, match="stop_after=3"):
        model(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), stop_after=3)


def test_probe_mass_is_the_share_of_the_full_softmax(llada):
    """Without pooling, the mass a query row gives all keys sums to 1 (the lse covers them all)."""
    seq = torch.randint(3, 200, (2, 20))
    probe = AttentionProbe([0, 1], slice(14, 20), slice(0, 20), pool_kernel=1)
    llada(seq, torch.arange(20).expand(2, 20), cache=probe)
    for scores in probe.token_scores:
        assert_close(scores.sum(-1), torch.full((2,), 6.0 * llada.cfg.n_heads), torch.float32)


@pytest.mark.parametrize("model_name, mode", [("llada", "masked"), ("llada", "causal"), ("dream", "causal"),
                                              ("dream", "masked")])
def test_draft_scores_are_mean_log_probs(model_name, mode, request):
    model = request.getfixturevalue(model_name)
    prompt = request_of(model, 20)
    chunks = split_chunks(prompt.context, 8, model.cfg.bos_id)
    draft = [5, 6, 7]
    scores = draft_scores(model, prompt, 8, draft, draft_likelihood=mode, score_batch=2)
    assert scores.shape == (len(chunks),) and (scores < 0).all()
    c = chunks[1]  # recompute one by hand
    if mode == "masked":
        seq = prompt.prefix + c + prompt.query + [model.cfg.mask_id] * 3
        logits = model(torch.tensor([seq]), torch.arange(len(seq))[None])[0, -3:]
        expected = logits.log_softmax(-1)[range(3), draft].mean()
    else:
        seq = prompt.prefix + c + prompt.query + draft
        n = len(seq)
        logits = model(torch.tensor([seq]), torch.arange(n)[None], mask=torch.ones(n, n, dtype=torch.bool).tril())[0]
        targets = prompt.query + draft
        first = len(prompt.prefix) + len(c)
        expected = logits[first - 1 : n - 1].log_softmax(-1)[range(len(targets)), targets].mean()
    assert_close(scores[1], expected, torch.float32)


# ---- 3. top-K ----------------------------------------------------------------------------------

def test_select_chunks_keeps_document_order_and_breaks_ties_early():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.9, float("nan"), 0.5])
    assert select_chunks(scores, 3) == [1, 3, 5]
    assert select_chunks(scores, 1) == [1]  # tie between 1 and 3: the earlier chunk
    assert select_chunks(scores, 6) == list(range(6)) and select_chunks(scores, 60) == list(range(6))
    assert 4 not in select_chunks(scores, 5)  # NaN ranks last
    with pytest.raises(ValueError, match="top_k=0"):
        select_chunks(scores, 0)


# ---- 4. token sparsity ---------------------------------------------------------------------------

def test_bos_survives_token_sparsity_and_order_is_kept():
    scores = torch.tensor([0.0, 5.0, 1.0, 9.0, 2.0, 8.0])
    assert keep_tokens(scores, 3, has_bos=True).tolist() == [0, 3, 5]
    assert keep_tokens(scores, 3, has_bos=False).tolist() == [1, 3, 5]
    assert keep_tokens(scores, 6, has_bos=True).tolist() == list(range(6))  # capacity >= length: no-op
    assert keep_tokens(scores, 60, has_bos=True).tolist() == list(range(6))
    with pytest.raises(ValueError, match="no room"):
        keep_tokens(scores, 1, has_bos=True)


def test_token_capacity_end_to_end(llada):
    gc = GenerationConfig(gen_length=8, block_length=8, steps=8)
    req = request_of(llada, 45)
    fixed = dict(chunk_size=8, top_k=3, chunking="bos_added")  # chunks of 9 rows
    big = generate(llada, [req], gc, method="prefill", **fixed)
    same = generate(llada, [req], gc, method="prefill", **fixed, token_capacity=9)
    small = generate(llada, [req], gc, method="prefill", **fixed, token_capacity=4)
    assert torch.equal(big.tokens, same.tokens)  # capacity >= chunk length changes nothing
    assert big.stats["kv_rows"][0] - small.stats["kv_rows"][0] == 3 * (9 - 4)


# ---- 5. positions ------------------------------------------------------------------------------

def test_position_modes():
    prompt = LongContextPrompt(prefix=[1, 2], context=[], query=[7, 8])
    chunks = [[0, 10, 11, 12], [0, 20, 21, 22], [0, 30, 31]]  # BOS + tokens
    kept = {0: torch.arange(4), 2: torch.tensor([0, 2])}  # chunk 2 lost a token to sparsity
    layouts = {m: build_layout(prompt, chunks, [0, 2], kept, 3, m, mask_id=99) for m in
               ("continuous", "reuse", "absolute")}
    for lay in layouts.values():
        assert lay.tokens == [1, 2, 0, 10, 11, 12, 0, 31, 7, 8, 99, 99, 99]
        assert lay.chunk_spans == [(2, 6), (6, 8)] and lay.query_start == 8 and lay.gen_start == 10
    assert layouts["continuous"].positions == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]
    assert layouts["reuse"].positions == [0, 1, 2, 3, 4, 5, 2, 4, 6, 7, 8, 9, 10]
    assert layouts["absolute"].positions == [0, 1, 2, 3, 4, 5, 10, 12, 13, 14, 15, 16, 17]


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k=0"), (dict(chunk_size=0), "chunk_size=0"), (dict(score="bm25"), "score='bm25'"),
    (dict(cache_mode="paged"), "cache_mode"), (dict(positions="rope"), "positions"),
    (dict(token_capacity=1), "token_capacity=1"), (dict(draft_likelihood="ar"), "draft_likelihood"),
    (dict(score_depth=0), "score_depth=0"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefillConfig(**kwargs)


def test_prefill_needs_structured_prompts_and_a_context(llada):
    gc = GenerationConfig(gen_length=8, block_length=8, steps=8)
    with pytest.raises(TypeError, match="LongContextPrompt"):
        generate(llada, [[1, 2, 3]], gc, method="prefill")
    with pytest.raises(ValueError, match="empty context"):
        generate(llada, [LongContextPrompt([1, 2], [], [3, 4])], gc, method="prefill")
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(llada, [request_of(llada)], GenerationConfig(gen_length=8, block_length=8, steps=8, cfg_scale=1.0),
                 method="prefill")


# ---- on a GPU: the kernel path end to end ------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_gpu_kernel_path_equals_dense_dual_cache(model_name, request):
    model = request.getfixturevalue(model_name).to("cuda")
    try:
        gen = GenerationConfig(gen_length=16, block_length=8, steps=16)  # not `gc`: the module is used below
        for req in (request_of(model, 45, seed=0), request_of(model, 30, seed=1)):
            dense, sparse = StepRecorder(make_method("dual")), StepRecorder(Prefill(**DENSE_EQUIVALENT))
            assert torch.equal(generate(model, [req], gen, method=sparse).tokens,
                               generate(model, [req], gen, method=dense).tokens)
            for a, b in zip(sparse.logits, dense.logits):
                assert_close(a, b, torch.float16)  # fp32 on the GPU: TF32-free kernel vs cuBLAS/SDPA
        out = generate(model, [request_of(model, 45)], gen, method="prefill", chunk_size=8, top_k=2,
                       token_capacity=5, score="attention")
        assert (out.tokens != model.cfg.mask_id).all()
        for name, kwargs in (("prefill", dict(chunk_size=8, top_k=2)), ("dual", {}), ("prefix", {})):
            graphed = StepRecorder(make_method(name, **kwargs))
            eager = StepRecorder(make_method(name, cuda_graphs=False, **kwargs))
            req = request_of(model, 45)
            assert torch.equal(generate(model, [req], gen, method=graphed).tokens,
                               generate(model, [req], gen, method=eager).tokens)
            for a, b in zip(graphed.logits, eager.logits):
                assert_close(a, b, torch.float32)
            # a method and its graphs (with their memory pools) go as soon as the method goes
            gc.disable()
            try:
                graphs, method = weakref.ref(graphed.method.graph), weakref.ref(graphed.method)
                assert graphs() is not None
                del graphed
                assert method() is None and graphs() is None
            finally:
                gc.enable()
    finally:
        model.to("cpu")


def test_answer_slots_are_scored_with_the_query(llada):
    prompt = request_of(llada, 45)
    plain = attention_scores(llada, prompt, 8, slots=0)
    slotted = attention_scores(llada, prompt, 8, slots=4)
    masked_query = LongContextPrompt(prompt.prefix, prompt.context, prompt.query + [llada.cfg.mask_id] * 4)
    assert_close(slotted, attention_scores(llada, masked_query, 8, slots=0), torch.float32)
    assert_close(slotted, attention_scores(llada, prompt, 8, slots=0, score_slots=4), torch.float32)
    assert not torch.allclose(plain, slotted)
    with pytest.raises(ValueError, match="score_slots=-1"):
        PrefillConfig(score_slots=-1)


class ForwardCounter:
    """Counts the model forwards (calls of the first block) while it is entered."""

    def __init__(self, model):
        self.model, self.n = model, 0

    def __enter__(self):
        self.hook = self.model.blocks[0].register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.hook.remove()


@pytest.mark.parametrize("knobs", [dict(top_k=2), dict(top_k=3, token_capacity=5, cache_mode="chunk_query"),
                                   dict(top_k=2, cache_mode="chunk_query", score_depth=1),
                                   dict(top_k=2, cache_mode="chunk_query", encode_once=False, positions="reuse"),
                                   dict(top_k=2, score="draft")])
def test_batched_prefill_gives_each_request_its_own_answer(llada, knobs):
    gc = GenerationConfig(gen_length=8, block_length=4, steps=8)
    batch = [request_of(llada, n, seed=s) for s, n in ((0, 45), (1, 20), (2, 33))]
    together_method = Prefill(chunk_size=8, **knobs)
    with ForwardCounter(llada) as batched:
        together = generate(llada, batch, gc, method=together_method)
    with ForwardCounter(llada) as serial:
        for row, req in enumerate(batch):
            alone_method = Prefill(chunk_size=8, **knobs)
            alone = generate(llada, [req], gc, method=alone_method)
            assert torch.equal(together.tokens[row], alone.tokens[0])
            assert together.stats["selected"][row] == alone.stats["selected"][0]
            assert_close(together_method.scores[row], alone_method.scores[0], torch.float32)
    assert not torch.isnan(together.tokens.float()).any()
    assert batched.n < serial.n  # chunks of one shape share scoring forwards, block starts one re-encode
    assert together.stats["reencode_s"] > 0 and together.stats["encode_once"] == (
        knobs.get("cache_mode") == "chunk_query" and "score_depth" not in knobs and knobs.get("encode_once", True))



@pytest.mark.parametrize("model_name, likelihood", [("llada", "masked"), ("dream", "causal"),
                                                    ("llada", "leave_one_out")])
@pytest.mark.parametrize("draft", [dict(draft_decoder="sampler", draft_scored="all"),
                                   dict(draft_decoder="confidence", draft_rounds=1, draft_scored="confirmed")])
def test_draft_scoring_batched_across_requests_equals_each_request_alone(model_name, likelihood, draft, request):
    """Every request's (prefix + chunk + query + draft) rows share the scoring forwards: the same
    scores, selection and tokens as each request alone, in fewer forwards. The confirmed drafts
    leave different slots unread per request, which must not leak from one row to another."""
    model = request.getfixturevalue(model_name)
    gc = GenerationConfig(gen_length=4, block_length=4, steps=4)
    batch = [request_of(model, n, seed=s) for s, n in ((0, 45), (1, 20), (2, 33))]
    knobs = dict(chunk_size=8, top_k=2, score="draft", draft_likelihood=likelihood, **draft)
    drafts = [draft_answer(model, req, **{k: v for k, v in knobs.items() if k != "score"}) for req in batch]
    if draft["draft_scored"] == "confirmed":
        assert all(1 <= sum(s) < 4 for _, s in drafts)  # some slots unread, so the confirmed path is exercised
    together_method = Prefill(**knobs)
    with ForwardCounter(model) as batched:
        together = generate(model, batch, gc, method=together_method)
    with ForwardCounter(model) as serial:
        for row, req in enumerate(batch):
            alone_method = Prefill(**knobs)
            alone = generate(model, [req], gc, method=alone_method)
            assert_close(together_method.scores[row], alone_method.scores[0], torch.float32)
            assert together.stats["selected"][row] == alone.stats["selected"][0]
            assert torch.equal(together.tokens[row], alone.tokens[0])
    assert batched.n < serial.n
    # the scoring alone, every row in one batch: one forward per row length (the full chunks of all
    # three requests share one, each short last chunk has its own) against two per request alone
    scorer = PrefillConfig(**knobs, score_batch=128).stage("score")
    requests = [chunked(req, 8, model.cfg.bos_id) for req in batch]
    with ForwardCounter(model) as shared:
        scores = score_requests_draft(model, requests, drafts, scorer)
    with ForwardCounter(model) as one_by_one:
        for r, (d, s), together_scores in zip(requests, drafts, scores):
            assert_close(together_scores, score_requests_draft(model, [r], [(d, s)], scorer)[0], torch.float32)
    lengths = {len(r.prompt.prefix + c + r.prompt.query) for r in requests for c in r.chunks}
    assert shared.n == len(lengths) == 4 and one_by_one.n == 2 * len(batch)
    # rows of one length that read other logit rows (2 query tokens moved into the prefix): the
    # causal rows of the moved request may not share a forward with the others', and none leaks
    moved = LongContextPrompt(batch[1].prefix + batch[1].query[:2], batch[1].context, batch[1].query[2:])
    mixed = [requests[0], chunked(moved, 8, model.cfg.bos_id)]
    mixed_scores = score_requests_draft(model, mixed, drafts[:2], scorer)
    for r, (d, s), together_scores in zip(mixed, drafts, mixed_scores):
        assert_close(together_scores, score_requests_draft(model, [r], [(d, s)], scorer)[0], torch.float32)


@pytest.mark.parametrize("model_name", ["llada", "dream"])
@pytest.mark.parametrize("draft", [dict(draft_decoder="sampler"), dict(draft_decoder="confidence", draft_rounds=1),
                                   dict(draft_decoder="confidence", draft_rounds=None, draft_threshold=0.2)])
def test_drafts_decode_as_one_batch_equal_to_each_request_alone(model_name, draft, request):
    """Prompts of different lengths (left padding, masked out of every key read) decode their
    drafts together: each the draft it gets alone, in as many forwards as the longest-running one
    alone (a row already full takes no further pick)."""
    model = request.getfixturevalue(model_name)
    base = [request_of(model, 20, seed=s) for s in range(3)]
    prompts = [LongContextPrompt(p.prefix[: 6 - s], p.context, p.query[: 6 - 2 * s]) for s, p in enumerate(base)]
    scorer = PrefillConfig(score="draft", draft_scored="confirmed", **draft).stage("score")
    with ForwardCounter(model) as together:
        drafts = draft_answers(model, prompts, scorer)
    alone = []
    for p, d in zip(prompts, drafts):
        with ForwardCounter(model) as count:
            assert draft_answers(model, [p], scorer)[0] == d
        alone.append(count.n)
    assert together.n == max(alone) and len({len(p.prefix + p.query) for p in prompts}) == 3
    if draft.get("draft_threshold"):  # until full: some row fills before the others and must stay as it is
        assert min(alone) < max(alone)


def scored_kv(model, prompt, chunk, rows, shift):
    """K/V (L, Hkv, C, D) of a chunk's rows from a fresh forward of prefix + chunk + rows at
    positions shift + (0..n-1): what a second encode of the chunk, placed `shift` later, gives."""
    seq = torch.tensor([prompt.prefix + chunk + rows])
    rec = KVRecorder()
    model(seq, shift + torch.arange(seq.shape[1])[None], cache=rec)
    k, v = rec.stacked()
    P = len(prompt.prefix)
    return k[:, 0, :, P : P + len(chunk)], v[:, 0, :, P : P + len(chunk)]


class ReencodedChunks(StepRecorder):
    """After begin, overwrite every selected chunk's pool rows with a second encode (scored_kv):
    the re-encoding path that encode-once replaces."""

    def __init__(self, method, slots):
        super().__init__(method)
        self.slots = slots

    def begin(self, model, batch):
        m = self.method
        m.begin(model, batch)
        for b, prompt in enumerate(batch.prompts):
            chunks = split_chunks(prompt.context, m.cfg.chunk_size, model.cfg.bos_id)
            lay, P = m.pool.layouts[b], len(prompt.prefix)
            for i, (s, e) in zip(m.selected[b], lay.chunk_spans):
                k, v = scored_kv(model, prompt, chunks[i], prompt.query + [model.cfg.mask_id] * self.slots,
                                 lay.positions[s] - P)
                m.pool.cache.store(m.pool.rows[b][s:e], k, v)


@pytest.mark.parametrize("positions, held", [("reuse", None), ("continuous", None), ("absolute", None),
                                             ("continuous", 1)])
def test_encode_once_reads_the_scoring_kv_and_decodes_as_a_second_encode_would(llada, positions, held, monkeypatch):
    """held=1: the stream holds one chunk's K/V and the selection keeps three (a selector that reaches
    past what it holds): the others are encoded again by their scoring forward, the same K/V."""
    if held is not None:
        from pdllm.prefill.selectors import TopK

        monkeypatch.setattr(TopK, "held", lambda self, n: held)
    gc = GenerationConfig(gen_length=8, block_length=4, steps=8)
    batch = [request_of(llada, 45, seed=0), request_of(llada, 33, seed=2)]
    knobs = dict(chunk_size=8, top_k=3, cache_mode="chunk_query", positions=positions, chunking="bos_added")
    once = StepRecorder(Prefill(**knobs))
    out = generate(llada, batch, gc, method=once)
    m = once.method
    assert m.stats["encode_once"]
    for b, prompt in enumerate(batch):  # the pool's chunk rows are the chunk's scoring K/V, moved to its place
        chunks, lay, pool = split_chunks(prompt.context, 8, llada.cfg.bos_id), m.pool.layouts[b], m.pool
        for i, (s, e) in zip(m.selected[b], lay.chunk_spans):
            k, v = scored_kv(llada, prompt, chunks[i], prompt.query + [llada.cfg.mask_id] * 4,
                             lay.positions[s] - len(prompt.prefix))
            assert_close(pool.cache.k[:, :, pool.rows[b][s:e]], k, torch.float32)
            assert_close(pool.cache.v[:, :, pool.rows[b][s:e]], v, torch.float32)
    again = ReencodedChunks(Prefill(**knobs), slots=4)
    assert torch.equal(generate(llada, batch, gc, method=again).tokens, out.tokens)
    for a, b in zip(once.logits, again.logits):
        assert_close(a, b, torch.float32)


def test_encode_once_probe_holds_only_the_chunk_rows(llada):
    """The K/V kept while scoring is the chunk's rows alone, not views of the layer's whole output."""
    seq = torch.randint(3, 200, (2, 20))
    probe = AttentionProbe([1], slice(14, 20), slice(4, 12), pool_kernel=1, keep_kv=True)
    llada(seq, torch.arange(20).expand(2, 20), cache=probe)
    assert len(probe.k) == len(probe.v) == llada.cfg.n_layers
    for t in probe.k + probe.v:
        assert t.shape[2] == 8 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_kept_kv_holds_exactly_the_chunks_top_k_picks(llada):
    from pdllm.prefill.cache_build import KeptKV
    from pdllm.prefill.stages import Span

    L, Hkv, D = llada.cfg.n_layers, llada.cfg.n_kv_heads, llada.cfg.head_dim
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, k = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        scores = torch.randint(0, 4, (n,), generator=g).float()  # many ties
        scores[torch.rand(n, generator=g) < 0.2] = float("nan")
        request = Chunked(LongContextPrompt([], [0] * 3 * n, []), [Span(3 * i, 3 * i + 3) for i in range(n)],
                          [[0] * 3] * n, list(range(n)))
        sink = KeptKV(llada, [request], [min(k, n)])
        for i in torch.randperm(n, generator=g).tolist():  # any order of scoring
            layers = [(torch.full((Hkv, 3, D), float(i)), torch.full((Hkv, 3, D), -float(i))) for _ in range(L)]
            sink.offer(0, i, scores[i].item(), lambda layers=layers: layers)
        picked = select_chunks(scores, k)
        assert sorted(sink.held[0]) == picked and all(sink.holds(0, i) == (i in picked) for i in range(n))
        for i in picked:  # each chunk's K/V sits in its own slot
            kk, vv = sink.kv(0, i)
            assert kk.shape == (L, Hkv, 3, D) and (kk == i).all() and (vv == -i).all()


@pytest.mark.parametrize("name, knobs", [("prefill", dict(chunk_size=8, top_k=2)), ("dual", {})])
def test_a_method_object_can_be_reused(llada, name, knobs):
    gc = GenerationConfig(gen_length=8, block_length=4, steps=8)
    first, second = request_of(llada, 45, seed=0), request_of(llada, 30, seed=1)
    method = make_method(name, **knobs)
    generate(llada, [first], gc, method=method)
    again = generate(llada, [second], gc, method=method)
    assert torch.equal(again.tokens, generate(llada, [second], gc, method=make_method(name, **knobs)).tokens)
    if name == "prefill":
        assert len(method.selected) == 1


# ---- cascaded and FP8 scoring ----------------------------------------------------------------------


def test_cascade_drops_chunks_early_and_ranks_the_survivors_at_full_depth(llada):
    prompt = request_of(llada, 45)  # 6 chunks of 8
    full = attention_scores(llada, prompt, 8, score_layers=1)
    keep_all = attention_scores(llada, prompt, 8, score_layers=1, score="cascade", cascade="1:1.0", cascade_min=2,
                                top_k=2)
    assert_close(keep_all, full, torch.float32)  # an exit that keeps every chunk is full-depth scoring
    early = attention_scores(llada, prompt, 8, score_layers=1, score_depth=1)  # what the exit after layer 1 reads
    cascade = attention_scores(llada, prompt, 8, score_layers=1, score="cascade", cascade="1:0.5", cascade_min=2,
                               top_k=2)
    survivors = select_chunks(early, 3)  # half of 6 survive the exit
    assert torch.isinf(cascade).sum() == 3 and sorted(torch.isfinite(cascade).nonzero().flatten().tolist()) == survivors
    assert_close(cascade[survivors], full[survivors], torch.float32)
    with pytest.raises(ValueError, match="cascade_min=2 must be >= top_k=4"):
        PrefillConfig(score="cascade", cascade="1:0.5", cascade_min=2)
    with pytest.raises(ValueError, match="increasing"):
        PrefillConfig(score="cascade", cascade="2:0.5,1:0.5")
    with pytest.raises(ValueError, match="not below the model's depth"):
        attention_scores(llada, prompt, 8, score="cascade", cascade="2:0.5")
    gc = GenerationConfig(gen_length=4, block_length=4, steps=4)
    out = generate(llada, [prompt], gc, method="prefill", chunk_size=8, top_k=2, score="cascade", cascade="1:0.5",
                   cascade_min=2, cache_mode="chunk_query")
    assert out.stats["encode_once"] and (out.tokens != llada.cfg.mask_id).all()  # the kept chunks encoded again


def test_fp8_scoring_ranks_as_bf16_does_and_keeps_no_kv(llada):
    from pdllm import fp8

    if not fp8.supported(llada.device):
        pytest.skip("this torch has no row-wise FP8 _scaled_mm on this device")
    prompt = request_of(llada, 45)
    with torch.no_grad():
        exact, approx = attention_scores(llada, prompt, 8), attention_scores(llada, prompt, 8, score_fp8=True)
    # e4m3 rounds each GEMM input to 2^-4 per element (~4% on a dot product), four GEMMs a block, two
    # blocks of a deliberately large-weighted model: the scores move by about a tenth, not more
    assert (approx - exact).norm() / exact.norm() < 0.2 and not torch.equal(approx, exact)
    assert fp8.model_weights(llada) is fp8.model_weights(llada)  # quantized once per model
    # encode once: the kept chunks' K/V is in the model's precision, from their bf16 scoring forward
    gc = GenerationConfig(gen_length=4, block_length=4, steps=4)
    knobs = dict(chunk_size=8, top_k=2, cache_mode="chunk_query", positions="reuse")  # every chunk at P: K comparable
    fast, exact = Prefill(**knobs, score_fp8=True), Prefill(**knobs)
    generate(llada, [prompt], gc, method=fast)
    generate(llada, [prompt], gc, method=exact)
    assert fast.stats["encode_once"]
    both = sorted(set(fast.selected[0]) & set(exact.selected[0]))
    assert both  # the scores are close: the selections share a chunk

    def kv_rows(m, i):
        s, e = m.pool.layouts[0].chunk_spans[m.selected[0].index(i)]
        return m.pool.cache.k[:, :, m.pool.rows[0][s:e]]

    for i in both:
        assert_close(kv_rows(fast, i), kv_rows(exact, i), torch.float32)


@pytest.mark.parametrize("knobs", [dict(), dict(score="draft"), dict(score="cascade", cascade="1:0.5", cascade_min=2,
                                                                         top_k=2)])
def test_scorers_report_the_chunks_they_score(llada, knobs):
    from pdllm.prefill.stages import chunk_progress

    seen = []
    batch = [request_of(llada, 45, seed=0), request_of(llada, 20, seed=1)]  # 6 + 3 chunks
    with chunk_progress(lambda n, total: seen.append((n, total))):
        generate(llada, batch, GenerationConfig(gen_length=4, block_length=4, steps=4), method="prefill",
                 chunk_size=8, score_batch=4, **knobs)
    assert sum(n for n, _ in seen) == 9 and {total for _, total in seen} == {9} and len(seen) > 1
