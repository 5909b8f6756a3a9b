"""The `official` preset: each step of the official Prefilling-dLLM selection, pinned on its own
(chunking, the draft's unmasking rule, the partial-draft score, positions), then all together."""

import pytest
import torch

from pdllm.cache import DenseKVCache
from pdllm.official import OFFICIAL_GENERATION, confidence_draft, generate_official, unmask_by_confidence
from pdllm.prefill import CHUNKERS, Chunked, Prefill, PrefillConfig, build_layout
from pdllm.prefill.draft import draft_answers, score_requests_draft
from pdllm.prefill.selectors import select_chunks
from pdllm.sampler import GenerationConfig, generate
from pdllm.testing import StepRecorder, assert_close
from pdllm.tokenizer import LongContextPrompt

BOS, MASK, V = 1, 0, 6  # the hand-made vocabulary of the unmasking tests


def split_chunks(context, chunk_size, bos_id, chunking="bos_added"):
    """The chunk rows a registered chunker cuts a bare context into."""
    prompt = LongContextPrompt([], context, [])
    return Chunked.of(prompt, CHUNKERS[chunking](chunk_size)(prompt, bos_id), bos_id).chunks


def draft_scores(model, prompt, cfg, draft, scored):
    """One request's draft scores under cfg's chunking and draft scorer, for a given draft."""
    bos = model.cfg.bos_id
    request = Chunked.of(prompt, cfg.stage("chunking")(prompt, bos), bos)
    return score_requests_draft(model, [request], [(draft, scored)], cfg.stage("score"))[0]


def draft_answer(model, prompt, cfg):
    return draft_answers(model, [prompt], cfg.stage("score"))[0]


# ---- 1. chunking: BOS inside the chunk_size rows, the last token of each full chunk dropped ----


def test_bos_in_chunk_drops_the_last_token_of_every_full_chunk():
    context = list(range(10, 30))  # 20 tokens, chunk_size 8: pieces of 8, 8, 4
    chunks = split_chunks(context, 8, BOS, "bos_in_chunk")
    assert [len(c) for c in chunks] == [8, 8, 5]
    assert chunks[0] == [BOS] + context[0:7] and chunks[1] == [BOS] + context[8:15]
    assert chunks[2] == [BOS] + context[16:20]  # a short last piece loses nothing
    kept = {t for c in chunks for t in c}
    assert [t for t in context if t not in kept] == [context[7], context[15]]  # never scored nor decoded


def test_bos_in_chunk_a_piece_that_starts_with_bos_gets_none_and_keeps_every_token():
    context = [BOS] + list(range(10, 17)) + list(range(20, 28))
    chunks = split_chunks(context, 8, BOS, "bos_in_chunk")
    assert chunks[0] == context[:8]  # already led by BOS: nothing added, nothing dropped
    assert chunks[1] == [BOS] + context[8:15]


def test_bos_added_is_pdllms_default_and_loses_nothing():
    context = list(range(10, 30))
    chunks = split_chunks(context, 8, BOS)
    assert [len(c) for c in chunks] == [9, 9, 5]
    assert [t for c in chunks for t in c[1:]] == context


def test_bos_in_chunk_needs_room_for_a_token():
    with pytest.raises(ValueError, match="chunk_size >= 2"):
        PrefillConfig(chunk_size=1, chunking="bos_in_chunk")


# ---- 2. the draft's unmasking rule, on hand-made logit sequences ------------------------------


def logits_of(*rows):
    """(1, L, V) logits whose softmax puts probability p on token t, for each (t, p) row."""
    out = torch.full((1, len(rows), V), -1e4)
    for i, (t, p) in enumerate(rows):
        rest = (1 - p) / (V - 1)
        out[0, i] = torch.log(torch.full((V,), rest))
        out[0, i, t] = torch.log(torch.tensor(p))
    return out


class Script:
    """slot_logits that plays back a fixed sequence and records the tokens it was shown."""

    def __init__(self, *steps):
        self.steps, self.seen = list(steps), []

    def __call__(self, tokens):
        self.seen.append(tokens.clone())
        return self.steps[min(len(self.seen) - 1, len(self.steps) - 1)]


def test_slot_zero_is_filled_from_the_first_forward_whatever_its_confidence():
    # slot 0 is the least confident slot of the first forward, and still filled first
    script = Script(logits_of((2, 0.3), (3, 0.95), (4, 0.99), (5, 0.97)),
                    logits_of((2, 0.3), (3, 0.1), (4, 0.6), (5, 0.2)))
    tokens = torch.full((1, 4), MASK)
    confirmed = unmask_by_confidence(script, tokens, MASK, rounds=1)
    assert tokens[0, 0] == 2
    assert script.seen[1][0].tolist() == [2, MASK, MASK, MASK]  # the round sees slot 0 filled, the rest masked
    assert tokens[0].tolist() == [2, MASK, 4, MASK]  # one round: the single most confident masked slot
    assert confirmed[0].tolist() == [True, False, True, False]


def test_partial_rounds_fill_one_slot_each():
    step = logits_of((2, 0.9), (3, 0.5), (4, 0.7), (5, 0.6))
    for rounds, filled in ((0, [2, MASK, MASK, MASK]), (2, [2, MASK, 4, 5]), (3, [2, 3, 4, 5]), (9, [2, 3, 4, 5])):
        script = Script(step)
        tokens = torch.full((1, 4), MASK)
        confirmed = unmask_by_confidence(script, tokens, MASK, rounds=rounds)
        assert tokens[0].tolist() == filled
        assert confirmed[0].tolist() == [t != MASK for t in filled]
        assert len(script.seen) == 1 + min(rounds, 3)  # the first forward, then one per round until full


def test_until_full_takes_the_top_slot_and_every_slot_at_the_threshold():
    first = logits_of((2, 0.5), (3, 0.5), (4, 0.5), (5, 0.5))
    second = logits_of((2, 0.5), (3, 0.95), (4, 0.3), (5, 0.9))  # 0.95 and 0.9 (>= 0.9) go together
    third = logits_of((2, 0.5), (3, 0.5), (4, 0.4), (5, 0.5))  # nothing above: the top-1 alone
    script = Script(first, second, third)
    tokens = torch.full((1, 4), MASK)
    confirmed = unmask_by_confidence(script, tokens, MASK, rounds=None, threshold=0.9)
    assert [s[0].tolist() for s in script.seen[1:]] == [[2, MASK, MASK, MASK], [2, 3, MASK, 5]]
    assert tokens[0].tolist() == [2, 3, 4, 5] and confirmed.all()


def test_mask_may_be_drawn_and_then_the_slot_stays_masked():
    step = logits_of((2, 0.9), (MASK, 0.99), (4, 0.6), (5, 0.5))
    tokens = torch.full((1, 4), MASK)
    confirmed = unmask_by_confidence(Script(step), tokens, MASK, rounds=1)  # the official rule: [MASK] wins slot 1
    assert tokens[0].tolist() == [2, MASK, MASK, MASK] and confirmed[0].tolist() == [True, True, False, False]
    tokens = torch.full((1, 4), MASK)
    unmask_by_confidence(Script(step), tokens, MASK, rounds=1, draw_mask=False)  # excluded: slot 1 falls to 0.2
    assert tokens[0].tolist() == [2, MASK, 4, MASK]
    script = Script(logits_of((2, 0.9), (MASK, 0.99)))  # until full: a slot that keeps drawing [MASK]
    tokens = torch.full((1, 2), MASK)
    assert unmask_by_confidence(script, tokens, MASK).all()  # the official code scores every slot then
    assert tokens[0].tolist() == [2, MASK] and len(script.seen) == 1 + 2 + 8  # its guard: L + 8 forwards


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_confidence_draft_encodes_the_prompt_alone_and_takes_slot_zero_from_its_logits(model_name, request):
    model = request.getfixturevalue(model_name)
    prompt = [model.cfg.bos_id] + list(range(10, 25))
    T, n, mask = len(prompt), 4, model.cfg.mask_id
    draft, confirmed = confidence_draft(model, prompt, n, rounds=1)
    # reference: one forward of prompt + masks in which the prompt rows cannot see the slots
    seq = torch.tensor([prompt + [mask] * n])
    sees = torch.ones(T + n, T + n, dtype=torch.bool)
    sees[:T, T:] = False
    logits = model(seq, torch.arange(T + n)[None], mask=sees)[0]
    slot0 = logits[T - 1] if model.cfg.logit_shift else logits[T]  # Dream: the last prompt logit
    assert draft[0] == slot0.argmax().item()
    assert sum(confirmed) == 2 and sum(t != mask for t in draft) <= 2  # one round: slot 0 + one more
    assert all(t == mask for t, c in zip(draft, confirmed) if not c)  # unconfirmed slots stay [MASK]


# ---- 3. the partial-draft score: which rows it reads ------------------------------------------


def request_of(model, context_len=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, model.cfg.vocab_size - 20, (n,), generator=g).tolist()  # noqa: E731
    return LongContextPrompt(prefix=[model.cfg.bos_id] + ids(3), context=ids(context_len), query=ids(4))


@pytest.mark.parametrize("model_name,mode", [("dream", "causal"), ("llada", "leave_one_out"), ("llada", "masked")])
def test_partial_draft_score_reads_the_query_and_the_confirmed_slots_only(model_name, mode, request):
    model = request.getfixturevalue(model_name)
    prompt = request_of(model)
    mask = model.cfg.mask_id
    chunks = split_chunks(prompt.context, 8, model.cfg.bos_id, "bos_in_chunk")
    draft, scored = [5, mask, 7, mask], [True, False, True, False]  # slots 1 and 3 unconfirmed: [MASK]
    cfg = PrefillConfig(chunk_size=8, chunking="bos_in_chunk", score="draft", draft_likelihood=mode, score_batch=3)
    scores = draft_scores(model, prompt, cfg, draft, scored)
    P, Q = len(prompt.prefix), len(prompt.query)
    for c, score in zip(chunks, scores):
        C = len(c)
        shown = [mask] * 4 if mode == "masked" else draft
        seq = prompt.prefix + c + prompt.query + shown
        T, pos = len(seq), torch.arange(len(seq))[None]
        if mode == "causal":  # row i - 1 predicts token i: rows of the query and of slots 0 and 2
            rows = [P + C + j for j in range(Q)] + [P + C + Q + 0, P + C + Q + 2]
            logits = model(torch.tensor([seq]), pos, mask=torch.ones(T, T, dtype=torch.bool).tril())[0]
            logp = [logits[r - 1].log_softmax(-1)[seq[r]] for r in rows]
        elif mode == "leave_one_out":  # each query token and confirmed slot masked alone
            rows = [P + C + j for j in range(Q)] + [P + C + Q + 0, P + C + Q + 2]
            logp = []
            for r in rows:
                x = list(seq)
                x[r] = mask
                logp.append(model(torch.tensor([x]), pos)[0, r].log_softmax(-1)[seq[r]])
        else:  # masked: all slots [MASK], the confirmed ones' true tokens read
            logits = model(torch.tensor([seq]), pos)[0]
            logp = [logits[P + C + Q + j].log_softmax(-1)[draft[j]] for j in (0, 2)]
        assert_close(score, torch.stack(logp).mean())


def test_draft_scored_all_reads_every_slot_and_confirmed_only_the_chosen(dream):
    prompt = request_of(dream)
    official = PrefillConfig.official("dream", chunk_size=8)
    draft, scored = draft_answer(dream, prompt, official)
    assert draft == confidence_draft(dream, prompt.prefix + prompt.query, 4, rounds=1)[0]
    assert sum(scored) == 2
    everything = PrefillConfig.official("dream", chunk_size=8, draft_scored="all")
    assert draft_answer(dream, prompt, everything) == (draft, [True] * 4)


# ---- 4. positions on the chunk_size grid, with a short last chunk -----------------------------


def positions_of(mode, grid, selected=(1, 2)):
    prompt = LongContextPrompt(prefix=[1, 2, 3], context=list(range(10, 30)), query=[7, 8])
    chunks = split_chunks(prompt.context, 8, BOS, "bos_in_chunk")  # rows 8, 8, 5: the last is short
    kept = {i: torch.arange(len(chunks[i])) for i in selected}
    lay = build_layout(prompt, chunks, list(selected), kept, 2, mode, MASK, grid)
    chunk_starts = [lay.positions[s] for s, _ in lay.chunk_spans]
    return chunk_starts, lay.positions[lay.query_start]


@pytest.mark.parametrize("mode,selected,grid_starts,grid_query,packed_starts,packed_query", [
    ("continuous", (1, 2), [3, 11], 3 + 2 * 8, [3, 11], 11 + 5),  # query at P + K * chunk_size: a gap of 3
    ("reuse", (1, 2), [3, 3], 3 + 8, [3, 3], 3 + 8),
    ("absolute", (0, 2), [3, 19], 19 + 5, [3, 19], 19 + 5),  # the query right after the last kept row
    ("absolute", (0, 1), [3, 11], 11 + 8, [3, 11], 3 + 8 + 8 + 5),  # official: not after the whole context
])
def test_positions_continuous_reuse_absolute_with_a_short_last_chunk(mode, selected, grid_starts, grid_query,
                                                                     packed_starts, packed_query):
    assert positions_of(mode, 8, selected) == (grid_starts, grid_query)  # official (Dream): the chunk_size grid
    assert positions_of(mode, None, selected) == (packed_starts, packed_query)  # pdllm: the real lengths


# ---- 5. every official knob, end to end, under threshold 0.9 ----------------------------------


def test_official_preset_is_the_readme_best_run_and_pdllm_defaults_stay():
    cfg = PrefillConfig.official("dream")
    assert (cfg.chunk_size, cfg.top_k, cfg.chunking, cfg.score, cfg.draft_tokens, cfg.draft_decoder,
            cfg.draft_rounds, cfg.draft_scored, cfg.draft_likelihood, cfg.score_batch, cfg.cache_mode,
            cfg.positions, cfg.position_grid, cfg.token_capacity) == (
        1024, 4, "bos_in_chunk", "draft", 4, "confidence", 1, "confirmed", "causal", 8, "full_prompt_mask",
        "continuous", "chunk_size", None)
    llada = PrefillConfig.official("llada")
    assert (llada.draft_likelihood, llada.position_grid) == ("leave_one_out", "lengths")
    assert cfg.slot0_logit == llada.slot0_logit == "block_start" and PrefillConfig().slot0_logit == "rerun"
    assert PrefillConfig.official("dream", draft_rounds=None).draft_rounds is None  # any knob can be taken back
    mine = PrefillConfig()
    assert (mine.chunking, mine.score, mine.draft_decoder, mine.draft_scored, mine.position_grid) == (
        "overlap", "attention", "sampler", "all", "lengths")
    with pytest.raises(ValueError, match="arch"):
        PrefillConfig.official("gpt2")


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_official_preset_end_to_end_under_threshold_0_9(model_name, request):
    model = request.getfixturevalue(model_name)
    prompt = request_of(model, context_len=28, seed=3)  # chunk_size 8: rows 8, 8, 8, 5 (short last chunk)
    cfg = PrefillConfig.official(model_name, chunk_size=8, top_k=2)
    gc = GenerationConfig(**{**OFFICIAL_GENERATION, "gen_length": 8, "block_length": 8})
    method = Prefill(cfg)
    out = generate(model, [prompt], gc, method=method)
    assert (out.tokens != model.cfg.mask_id).all() and out.nfe <= 8

    # the selection, recomputed from its official steps one by one
    chunks = split_chunks(prompt.context, 8, model.cfg.bos_id, "bos_in_chunk")
    assert method.chunk_lengths[0] == [8, 8, 8, 5]
    draft, confirmed = confidence_draft(model, prompt.prefix + prompt.query, 4, rounds=1)
    scores = draft_scores(model, prompt, cfg, draft, confirmed)
    assert_close(method.scores[0], scores)
    assert method.selected[0] == select_chunks(scores, 2)
    lay = method.pool.layouts[0]
    P, K = len(prompt.prefix), len(method.selected[0])
    starts = [lay.positions[s] for s, _ in lay.chunk_spans]
    if model_name == "dream":  # chunk k at P + k * chunk_size, the query at P + K * chunk_size
        assert starts == [P + 8 * k for k in range(K)] and lay.positions[lay.query_start] == P + 8 * K
    else:  # LLaDA: positions follow the sequence (the official LLaDA takes no position ids)
        assert lay.positions == list(range(len(lay.tokens)))


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_official_answer_path_fills_slot_zero_first_then_thresholds_at_0_9(model_name, request):
    model = request.getfixturevalue(model_name)
    mask = model.cfg.mask_id
    prompt = request_of(model, context_len=28, seed=4)
    gc = GenerationConfig(**{**OFFICIAL_GENERATION, "gen_length": 8, "block_length": 8})
    steps = StepRecorder(Prefill(PrefillConfig.official(model_name, chunk_size=8, top_k=2)))
    out = generate_official(model, [prompt], gc, steps)
    answer = out.tokens[0]
    blocks = [b[0] for b, _ in steps.steps[1:]] + [answer]  # the block before each step, then the answer
    first_block, first_logits = steps.steps[0]
    assert (first_block == mask).all()
    assert blocks[0].tolist() == [first_logits[0, 0].argmax().item()] + [mask] * 7  # step 0 fills slot 0 alone
    for (before, logits), after in zip(steps.steps[1:], blocks[1:]):  # then: the top-1 and every slot >= 0.9
        before, probs = before[0], logits[0].softmax(-1)
        conf, x0 = probs.max(-1)  # over the whole vocabulary: [MASK] may be drawn
        masked = before == mask
        conf = torch.where(masked, conf, -1.0)
        chosen = (conf >= 0.9) | (torch.arange(8) == conf.argmax())
        assert torch.equal(after, torch.where(chosen & masked, x0, before))
    assert out.nfe == len(steps.steps) <= 1 + 8 + 8
    # pdllm's own sampler takes top-1 + threshold from the first forward: a different answer path
    mine = StepRecorder(Prefill(PrefillConfig.official(model_name, chunk_size=8, top_k=2)))
    generate(model, [prompt], gc, method=mine)
    assert torch.equal(mine.steps[0][1], first_logits)  # same selection, same first forward


@pytest.mark.parametrize("checkpoint", ["llada_dir", "dream_dir"])
def test_cli_preset_official(checkpoint, tmp_path, capsys, request):
    from pdllm.cli import main

    ctx = tmp_path / "ctx.txt"
    ctx.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    args = ["generate", "--model", str(request.getfixturevalue(checkpoint)), "--context-file", str(ctx), "--question",
            "what is the pass key", "--gen-length", "8", "--block-length", "8", "--steps", "8", "--method", "prefill",
            "--preset", "official", "--chunk-size", "16", "--top-k", "2"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[prefill]" in err and "selected chunks" in err
    assert main([a if a != "prefill" else "dual" for a in args]) == 2  # a user error: one line, exit 2
    assert "use it with --method prefill" in capsys.readouterr().err
    assert main(args + ["--temperature", "0.5"]) == 2
    assert "greedily" in capsys.readouterr().err


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_official_answer_path_batch_rows_match_single_requests(model_name, request):
    model = request.getfixturevalue(model_name)
    prompts = [request_of(model, context_len=28, seed=4), request_of(model, context_len=21, seed=5)]
    gc = GenerationConfig(**{**OFFICIAL_GENERATION, "gen_length": 8, "block_length": 4})
    cfg = PrefillConfig.official(model_name, chunk_size=8, top_k=2)
    together = generate_official(model, prompts, gc, Prefill(cfg)).tokens
    for row, p in zip(together, prompts):
        assert torch.equal(row, generate_official(model, [p], gc, Prefill(cfg)).tokens[0])


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_official_cached_step_is_the_block_against_the_block_start_kv(model_name, request):
    """The official dual cache: after the block start's encode of the whole layout, a step runs
    the block alone against that KV (Dream: the row before the block is not re-run, its logit,
    slot 0's, is the block start's)."""
    model = request.getfixturevalue(model_name)
    prompt = request_of(model, context_len=28, seed=4)
    gc = GenerationConfig(**{**OFFICIAL_GENERATION, "gen_length": 8, "block_length": 8})
    steps = StepRecorder(Prefill(PrefillConfig.official(model_name, chunk_size=8, top_k=2)))
    generate_official(model, [prompt], gc, steps)
    assert len(steps.steps) >= 2
    lay = steps.method.pool.layouts[0]
    G0, T = lay.gen_start, len(lay.tokens)
    cache = DenseKVCache.for_model(model, 1, T)
    pos = torch.tensor([lay.positions])
    model(torch.tensor([lay.tokens[:G0] + [model.cfg.mask_id] * 8]), pos, cache=cache.window(0))  # block start
    block = steps.steps[1][0]  # the block as the first cached step saw it (slot 0 filled)
    ref = model(block, pos[:, G0:], cache=cache.window(G0))
    if model.cfg.logit_shift:
        ref = torch.cat([steps.steps[0][1][:, :1], ref[:, :-1]], dim=1)
    assert_close(steps.steps[1][1], ref)


def test_cli_preset_takes_the_given_flags_on_top_and_pdllm_defaults_without_it():
    from pdllm.cli import PRESETS, build_parser, generation_config, make_cli_method

    argv = ["generate", "--method", "prefill", "--chunk-size", "16", "--positions", "reuse"]
    with_preset, preset = build_parser().parse_args(argv + ["--preset", "official"]), PRESETS["official"]()
    assert make_cli_method(with_preset, "dream", preset).cfg == PrefillConfig.official("dream", chunk_size=16,
                                                                                       positions="reuse")
    assert generation_config(with_preset, preset).threshold == 0.9
    plain = build_parser().parse_args(argv)
    assert make_cli_method(plain, "dream", None).cfg == PrefillConfig(chunk_size=16, positions="reuse")
    assert generation_config(plain).threshold is None
