"""Prefilling-dLLM: chunked prefilling with BOS anchors, chunk scoring, top-K selection, token
sparsity, and decoding against the selected chunks' KV (arXiv 2606.10537).

The method, in the order it runs (``Prefill.begin``):

1. **Chunking with BOS anchors.** The context is split into chunks of ``chunk_size`` tokens and a
   BOS token is put in front of every chunk, so each chunk carries its own attention sink
   (``chunking="bos_in_chunk"``, the official code's: the BOS takes one of the chunk_size rows).
2. **Scoring**, once, streamed chunk by chunk (memory O(chunk x score_batch) whatever the context
   length), the chunks of every request of a batch sharing forwards (grouped by shape):
   ``attention``: each chunk is encoded with the prefix, the query and the masked answer slots
   (prefix + [BOS + chunk] + query + [MASK] * n); the attention of the query and answer-slot rows
   to the chunk's keys in the last layers, max-pooled along tokens, summed over heads, averaged
   over layers and tokens, is the chunk's score. The answer slots are where a diffusion model will
   decode the answer, so their attention says where the answer is; the query's own rows attend
   to what the question is about, not to where its answer sits (the official code scores the
   query rows alone: ``score_slots=0``). ``score_depth`` exits early: the
   scoring forward runs that many layers and reads the last ``score_layers`` of them (GemFilter).
   ``draft``: a short draft answer is decoded from prefix + query alone; a chunk's score is how
   likely it makes the draft: the mean log-probability of the draft tokens given prefix + [BOS +
   chunk] + query (masked likelihood for a bidirectional model like LLaDA, next-token
   likelihood of query + draft under a causal mask for an AR-initialised model like Dream).
   The official code's draft and score are knobs too (``draft_decoder="confidence"``,
   ``draft_scored="confirmed"``, ``draft_likelihood="leave_one_out"``; ``PrefillConfig.official``).
3. **Top-K selection**: the K best chunks, kept in document order.
4. **Token sparsity** (optional): inside each selected chunk keep the ``token_capacity`` tokens the
   query attends to most (SnapKV-style pooling), the BOS anchor always.
5. **Cache build**: ``full_prompt_mask`` re-encodes prefix + selected chunks + query (+ the masked
   answer) jointly, at each block start; ``chunk_query`` encodes each chunk once against the prefix
   and the last query tokens and reuses that KV as is. With full-depth attention scoring the
   chunk was already encoded once, against the prefix, the query and the answer slots: then
   (``encode_once``) the decode reads that K/V, kept for the running top K while scoring, and no
   chunk is encoded a second time. Positions: ``continuous`` (selected chunks packed one after
   another), ``reuse`` (the positions each chunk had when encoded), ``absolute`` (its original
   place in the BOS-anchored context); ``position_grid="chunk_size"`` gives every chunk exactly
   chunk_size positions whatever its length, as the official code does for Dream.
6. **Decoding**: the sampler's steps run the answer block against the pool of prefix + selected
   chunks + query + answer (``ChunkKVCache``), through the Triton kernel on a GPU.

With ``chunk_bos=False``, every chunk selected, ``full_prompt_mask`` and ``absolute`` positions,
this is exactly the dense dual cache (tests/test_prefill.py proves it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdllm import distributed
from pdllm.attention import chunk_attention, dense_attention, key_attention_mass
from pdllm.cache import ChunkKVCache
from pdllm.graphs import StepGraph, capture, graphs_available
from pdllm.model import apply_rope
from pdllm.official import confidence_drafts
from pdllm.sampler import Batch, GenerationConfig, Vanilla, generate, synchronize
from pdllm.tokenizer import LongContextPrompt

SCORE_MODES = ("attention", "draft")
CACHE_MODES = ("full_prompt_mask", "chunk_query")
POSITION_MODES = ("continuous", "reuse", "absolute")
CHUNKINGS = ("bos_added", "bos_in_chunk")  # the BOS is an extra row | takes one of the chunk_size rows (official)
DRAFT_DECODERS = ("sampler", "confidence")  # pdllm's sampler | the official confidence rule (pdllm.official)
DRAFT_LIKELIHOODS = ("masked", "causal", "leave_one_out", None)
POSITION_GRIDS = ("lengths", "chunk_size")  # chunks take their real lengths | a chunk_size grid (official, Dream)


@dataclass
class PrefillConfig:
    chunk_size: int = 1024
    top_k: int = 4  # K >= number of chunks keeps every chunk
    chunk_bos: bool = True  # BOS anchor in front of every chunk
    score: str = "attention"  # see SCORE_MODES
    score_layers: int = 4  # attention scoring reads the last N layers at or below score_depth
    score_depth: int | None = None  # layers the scoring forward runs (early exit); None: all of them
    score_slots: int | None = None  # [MASK] answer slots scored with the query; None: the block length
    score_batch: int = 8  # chunks per scoring forward
    pool_kernel: int = 7  # max-pool width along tokens (SnapKV)
    draft_tokens: int = 4  # draft scoring: length of the draft answer
    draft_likelihood: str | None = None  # see DRAFT_LIKELIHOODS; None: causal for shifted-logit models, else masked
    draft_decoder: str = "sampler"  # see DRAFT_DECODERS
    draft_rounds: int | None = None  # confidence draft: R rounds of one slot each; None: until full (threshold)
    draft_threshold: float = 0.9  # confidence draft until full: every slot at or above it is unmasked
    draft_draws_mask: bool = True  # confidence draft: [MASK] may win the argmax (the official code allows it)
    draft_scored: str = "all"  # "all" draft slots are scored, or only the "confirmed" ones (the rest stay [MASK])
    chunking: str = "bos_added"  # see CHUNKINGS
    token_capacity: int | None = None  # tokens kept per selected chunk (BOS included); None = all
    token_query_window: int = 8  # token sparsity scores with the last N query rows, all layers
    cache_mode: str = "full_prompt_mask"
    chunk_query_window: int = 8  # chunk_query: each chunk is encoded with the last N query tokens
    encode_once: bool = True  # chunk_query + full-depth attention scoring: decode reads the scoring K/V
    positions: str = "continuous"
    position_grid: str = "lengths"  # see POSITION_GRIDS and build_layout
    slot0_logit: str = "rerun"  # Dream's cached steps: "rerun" the row before the block with it, or keep
    # that row's K/V and logit from the "block_start" re-encode (the official dual cache)
    chunk_parallel: bool = False  # score the chunks across torch.distributed's ranks (torchrun); see pdllm.distributed

    @classmethod
    def official(cls, arch: str, **overrides) -> "PrefillConfig":
        """The official code's selection, step by step, as its README's best LongBench run sets it
        (``arch``: "dream" or "llada"; README "Reproducing the official code" lists each knob).

        Per model, as the official code runs them: Dream scores the draft with next-token
        log-probabilities under a causal mask and places chunks on a chunk_size grid; for LLaDA it
        scores each label token masked alone (full attention: Fast-dLLM's LLaDA ignores the causal
        mask it is given) and positions follow the sequence (its LLaDA takes no position ids).
        """
        if arch not in ("dream", "llada"):
            raise ValueError(f"PrefillConfig.official(arch={arch!r}): arch must be 'dream' or 'llada'")
        dream = arch == "dream"
        knobs = dict(chunk_size=1024, top_k=4, chunk_bos=True, chunking="bos_in_chunk", score="draft",
                     draft_tokens=4, draft_decoder="confidence", draft_rounds=1, draft_threshold=0.9,
                     draft_draws_mask=True, draft_scored="confirmed",
                     draft_likelihood="causal" if dream else "leave_one_out", score_batch=8, token_capacity=None,
                     cache_mode="full_prompt_mask", positions="continuous",
                     position_grid="chunk_size" if dream else "lengths", slot0_logit="block_start")
        return cls(**{**knobs, **overrides})

    def __post_init__(self):
        problems = []
        if self.chunk_size < 1:
            problems.append(f"chunk_size={self.chunk_size} must be >= 1")
        if self.chunking == "bos_in_chunk" and self.chunk_bos and self.chunk_size < 2:
            problems.append(f"chunking='bos_in_chunk' needs chunk_size >= 2 (the BOS takes one of its "
                            f"{self.chunk_size} rows)")
        if self.top_k < 1:
            problems.append(f"top_k={self.top_k} must be >= 1 (use a K >= the number of chunks to keep all)")
        for name, value, allowed in (("score", self.score, SCORE_MODES), ("cache_mode", self.cache_mode, CACHE_MODES),
                                     ("positions", self.positions, POSITION_MODES),
                                     ("draft_likelihood", self.draft_likelihood, DRAFT_LIKELIHOODS),
                                     ("draft_decoder", self.draft_decoder, DRAFT_DECODERS),
                                     ("draft_scored", self.draft_scored, ("all", "confirmed")),
                                     ("chunking", self.chunking, CHUNKINGS),
                                     ("position_grid", self.position_grid, POSITION_GRIDS),
                                     ("slot0_logit", self.slot0_logit, ("rerun", "block_start"))):
            if value not in allowed:
                problems.append(f"{name}={value!r} must be one of {allowed}")
        if self.token_capacity is not None and self.token_capacity < 1 + self.chunk_bos:
            problems.append(f"token_capacity={self.token_capacity} must keep at least one token besides the BOS")
        if self.score_depth is not None and self.score_depth < 1:
            problems.append(f"score_depth={self.score_depth} must be >= 1 (or None: the full depth)")
        if self.draft_rounds is not None and self.draft_rounds < 0:
            problems.append(f"draft_rounds={self.draft_rounds} must be >= 0 (or None: decode the draft until full)")
        if not 0.0 < self.draft_threshold <= 1.0:
            problems.append(f"draft_threshold={self.draft_threshold} must be in (0, 1]")
        if self.score_slots is not None and self.score_slots < 0:
            problems.append(f"score_slots={self.score_slots} must be >= 0")
        if min(self.score_layers, self.score_batch, self.draft_tokens, self.token_query_window,
               self.chunk_query_window, self.pool_kernel) < 1:
            problems.append("score_layers, score_batch, draft_tokens, windows and pool_kernel must be >= 1")
        if problems:
            raise ValueError("invalid prefill config: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# 1. Chunking with BOS anchors
# ---------------------------------------------------------------------------------------------


def split_chunks(context: list[int], chunk_size: int, bos_id: int | None,
                 chunking: str = "bos_added") -> list[list[int]]:
    """Consecutive pieces of chunk_size tokens (the last may be shorter), each led by bos_id.

    ``bos_added``: the BOS is an extra row (chunk_size + 1 rows, nothing lost). ``bos_in_chunk``
    (the official code): the BOS is put in front and the chunk cut back to chunk_size rows, so
    the last token of every full piece is dropped, never scored nor decoded; a piece that
    already starts with BOS gets none and keeps all its tokens.
    """
    if not context:
        raise ValueError("empty context: there is nothing to chunk")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if chunking not in CHUNKINGS:
        raise ValueError(f"chunking={chunking!r} must be one of {CHUNKINGS}")
    pieces = [context[i : i + chunk_size] for i in range(0, len(context), chunk_size)]
    if bos_id is None:
        return pieces
    if chunking == "bos_added":
        return [[bos_id] + p for p in pieces]
    return [p if p[0] == bos_id else ([bos_id] + p)[:chunk_size] for p in pieces]


# ---------------------------------------------------------------------------------------------
# 2. Scoring, streamed chunk by chunk
# ---------------------------------------------------------------------------------------------


class AttentionProbe:
    """Plain self-attention that, in chosen layers, measures how much attention the query rows
    give each key of the chunk: (B, L_chunk) per layer, max-pooled along tokens, summed over heads.

    The mass comes from the chunk-attention kernels (first pass: log-sum-exp of the query rows over
    all keys; second pass: each chunk key's share), so no attention matrix is materialised. With
    ``keep_kv`` it also keeps every layer's K/V of the chunk rows (encode once).
    """

    def __init__(self, layers, query_rows: slice, key_rows: slice, pool_kernel: int, keep_kv: bool = False):
        self.layers, self.query_rows, self.key_rows, self.pool_kernel = set(layers), query_rows, key_rows, pool_kernel
        self.token_scores: list[torch.Tensor] = []  # one (B, L_chunk) fp32 per probed layer
        self.keep_kv = keep_kv
        self.k: list[torch.Tensor] = []  # with keep_kv: one (B, Hkv, L_chunk, D) per layer run
        self.v: list[torch.Tensor] = []

    def attend(self, layer, q, k, v, mask=None, backend="sdpa"):
        out = dense_attention(q, k, v, mask, backend)
        if self.keep_kv:  # copies of the chunk rows: a view would keep the layer's whole q/k/v output alive
            self.k.append(k[:, :, self.key_rows].clone())
            self.v.append(v[:, :, self.key_rows].clone())
        if layer in self.layers:
            B, Hkv, T, D = k.shape
            pool_k = k.transpose(0, 1).reshape(Hkv, B * T, D)  # the batch's keys as one pool
            pool_v = v.transpose(0, 1).reshape(Hkv, B * T, D)
            base = torch.arange(B, device=k.device)[:, None] * T
            everything = (base + torch.arange(T, device=k.device)).int()
            chunk_keys = (base + torch.arange(T, device=k.device)[self.key_rows]).int()
            qr = q[:, :, self.query_rows]
            full = torch.full((B,), T, dtype=torch.int32, device=k.device)
            _, lse = chunk_attention(qr, pool_k, pool_v, everything, full)  # (B, H, Tq)
            mass = key_attention_mass(qr, pool_k, chunk_keys, full.new_full((B,), chunk_keys.shape[1]), lse)
            self.token_scores.append(pool_tokens(mass, self.pool_kernel).sum(dim=1))  # (B, L_chunk)
        return out


def pool_tokens(mass: torch.Tensor, kernel: int) -> torch.Tensor:
    """SnapKV smoothing: max-pool (B, H, L) along L with a centred window, same length out."""
    kernel = min(kernel, mass.shape[-1])
    pooled = F.max_pool1d(mass, kernel, stride=1, padding=kernel // 2)
    return pooled[..., : mass.shape[-1]]


def _batches(shapes, batch_size):
    """Indices grouped by shape (so no padding is needed), in batches."""
    by_shape: dict = {}
    for i, s in enumerate(shapes):
        by_shape.setdefault(s, []).append(i)
    for ids in by_shape.values():
        for j in range(0, len(ids), batch_size):
            yield ids[j : j + batch_size]


@dataclass
class ScoringJob:
    """One chunk's scoring forward: prefix + chunk + rows (query and answer slots), positions 0..n-1."""

    prefix: list[int]
    chunk: list[int]
    rows: list[int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.prefix), len(self.chunk), len(self.rows)


def scored_batches(model, jobs: list[ScoringJob], layers, pool_kernel: int, batch_size: int, keep_kv: bool = False):
    """Run the jobs' forwards batch_size at a time, grouped by shape, whichever request they come
    from; yield (job ids, pooled attention (n, L_chunk) mean over ``layers``, probe).

    Each forward is a local sequence of one chunk, so memory is O(chunk x batch_size) whatever the
    context, and it stops after the deepest layer read (early exit: no later layer, no head).
    """
    dev = model.device
    for ids in _batches([j.shape for j in jobs], batch_size):
        P, C, Q = jobs[ids[0]].shape
        idx = torch.tensor([jobs[i].prefix + jobs[i].chunk + jobs[i].rows for i in ids], device=dev)
        pos = torch.arange(idx.shape[1], device=dev).expand_as(idx)
        probe = AttentionProbe(layers, slice(P + C, P + C + Q), slice(P, P + C), pool_kernel, keep_kv)
        model(idx, pos, cache=probe, stop_after=max(layers) + 1)
        yield ids, torch.stack(probe.token_scores).float().mean(dim=0), probe


def attention_token_scores(model, jobs: list[ScoringJob], layers, pool_kernel: int, batch_size: int) -> list[torch.Tensor]:
    """Per job, the pooled attention its rows give each token of its chunk, mean over layers."""
    scores: list[torch.Tensor | None] = [None] * len(jobs)
    for ids, per_token, _ in scored_batches(model, jobs, layers, pool_kernel, batch_size):
        per_token = per_token.cpu()
        for row, i in enumerate(ids):
            scores[i] = per_token[row]
    return scores


def scoring_depth(model, cfg: PrefillConfig) -> int:
    """How many layers the scoring forward runs: cfg.score_depth, or the model's full depth."""
    L = model.cfg.n_layers
    if cfg.score_depth is not None and cfg.score_depth > L:
        raise ValueError(f"score_depth={cfg.score_depth} is deeper than the model ({L} layers); use <= {L} or None")
    return L if cfg.score_depth is None else cfg.score_depth


class StreamedTopK:
    """Each request's K best chunks so far, with the K/V their scoring forward computed, in K slots
    of pool rows (encode once). Holding every chunk's K/V until all are scored would cost
    O(context) memory; a chunk's K/V is copied into a slot only while it ranks in the top K, in
    select_chunks' order (higher score, then the earlier chunk; NaN last), so the chunks held at
    the end are exactly the ones select_chunks picks.
    """

    def __init__(self, cache: ChunkKVCache, k: int, chunks: list[list[list[int]]]):
        self.cache = cache
        self.slots = [[cache.allocate(max(map(len, cs))) for _ in range(min(k, len(cs)))] for cs in chunks]
        self.held: list[dict[int, int]] = [{} for _ in chunks]  # chunk -> slot, per request
        self.rank: list[dict[int, tuple]] = [{} for _ in chunks]  # chunk -> its sort key

    def offer(self, b: int, i: int, score: float, probe: AttentionProbe, row: int):
        key = (float("inf") if score != score else -score, i)
        held, rank = self.held[b], self.rank[b]
        if len(held) < len(self.slots[b]):
            slot = len(held)
        else:
            worst = max(held, key=rank.__getitem__)
            if key >= rank[worst]:
                return
            slot = held.pop(worst)
            del rank[worst]
        held[i], rank[i] = slot, key
        rows = self.slots[b][slot][: probe.k[0].shape[2]]
        for layer, (k, v) in enumerate(zip(probe.k, probe.v)):  # this row's (Hkv, C, D) of each layer
            self.cache.write(layer, rows, k[row][None], v[row][None])

    def rows(self, b: int, i: int) -> torch.Tensor:
        """Pool rows holding chunk i of request b (its first len(chunk) rows)."""
        return self.slots[b][self.held[b][i]]


def score_requests_attention(model, prompts, chunks, cfg: PrefillConfig, slots: int = 0,
                             keep: StreamedTopK | None = None) -> list[torch.Tensor]:
    """Chunk score = mean over its tokens of the pooled attention of the query and ``slots``
    masked answer rows, in the last cfg.score_layers layers at or below cfg.score_depth (GemFilter's
    observation: early layers already find where the answer is, at a fraction of the forward).

    The chunks of every request go through shared forwards. Returns (n_chunks,) fp32 per request;
    ``keep`` takes the K/V of the chunks ranking in the top K as they are scored.
    """
    depth = scoring_depth(model, cfg)
    layers = range(max(0, depth - cfg.score_layers), depth)
    jobs, owner = [], []
    for b, (prompt, cs) in enumerate(zip(prompts, chunks)):
        rows = prompt.query + [model.cfg.mask_id] * slots
        jobs += [ScoringJob(prompt.prefix, c, rows) for c in cs]
        owner += [(b, i) for i in range(len(cs))]
    scores = [torch.empty(len(cs)) for cs in chunks]
    for ids, per_token, probe in scored_batches(model, jobs, layers, cfg.pool_kernel, cfg.score_batch, keep is not None):
        chunk_scores = per_token.mean(dim=1).cpu()
        for row, j in enumerate(ids):
            b, i = owner[j]
            scores[b][i] = chunk_scores[row]
            if keep is not None:
                keep.offer(b, i, chunk_scores[row].item(), probe, row)
    return scores


def score_chunks_attention(model, prompt: LongContextPrompt, chunks, cfg: PrefillConfig, slots: int = 0) -> torch.Tensor:
    """The attention scores of one request's chunks (see score_requests_attention)."""
    return score_requests_attention(model, [prompt], [chunks], cfg, slots)[0]


def draft_answers(model, prompts, cfg: PrefillConfig) -> list[tuple[list[int], list[bool]]]:
    """Per request, a short draft answer from prefix + query alone (no context), decoded greedily,
    and which of its slots the scores read (``cfg.draft_scored``); all requests decode as one batch.

    ``sampler``: pdllm's vanilla sampler over prefix + query + [MASK] * n, one slot per step.
    ``confidence``: the official procedure (``pdllm.official.confidence_drafts``): the prompt
    encoded alone, the slots against its KV, slot 0 from its logit, then ``draft_rounds`` rounds of
    the single most confident slot, or until full by ``draft_threshold``; unconfirmed slots stay
    [MASK] in the draft.
    """
    n, ids = cfg.draft_tokens, [p.prefix + p.query for p in prompts]
    if cfg.draft_decoder == "sampler":  # left-padded, padding masked out of every key read
        gc = GenerationConfig(gen_length=n, block_length=n, steps=n)
        drafts = [(d, [True] * n) for d in generate(model, ids, gc, method=Vanilla()).tokens.tolist()]
    else:
        drafts = confidence_drafts(model, ids, n, cfg.draft_rounds, cfg.draft_threshold, cfg.draft_draws_mask)
    return [(d, confirmed if cfg.draft_scored == "confirmed" else [True] * n) for d, confirmed in drafts]


def draft_answer(model, prompt: LongContextPrompt, cfg: PrefillConfig) -> tuple[list[int], list[bool]]:
    """One request's draft and the slots its scores read (see draft_answers)."""
    return draft_answers(model, [prompt], cfg)[0]


@dataclass
class DraftJob:
    """One chunk's draft-likelihood row: prefix + chunk + query + draft (shown as the mode wants),
    the logit rows (or, leave one out, the token positions) first.. that predict ``targets``, and
    which targets are ``read`` (the query and the scored draft slots)."""

    request: int
    chunk: int
    tokens: list[int]
    first: int
    targets: list[int]
    read: list[bool]


def score_requests_draft(model, prompts, chunks, drafts, cfg: PrefillConfig) -> list[torch.Tensor]:
    """Chunk score = mean log-probability of the draft (higher = the chunk supports the answer).

    ``masked`` (bidirectional models, LLaDA): the draft slots are [MASK]; score the true draft
    token at each slot — the masked-diffusion likelihood. ``causal`` (AR-initialised, Dream): a
    causal mask, and the log-probability of every query and draft token given what precedes it.
    ``leave_one_out`` (the official code's LLaDA score): every query and draft token scored with
    itself alone masked, full attention, one row per token. ``drafts[b]`` is request b's (draft,
    scored): ``scored`` says which draft slots count; the others stay in the row as they are
    (official: [MASK]) and are not read.

    The rows of every request go through shared forwards, grouped by shape (the same length and
    the same logit rows read). Returns (n_chunks,) fp32 per request.
    """
    mode = cfg.draft_likelihood or ("causal" if model.cfg.logit_shift else "masked")
    dev, mask_id = model.device, model.cfg.mask_id
    jobs = []
    for b, (prompt, cs, (draft, scored)) in enumerate(zip(prompts, chunks, drafts)):
        P, Q, d = len(prompt.prefix), len(prompt.query), len(draft)
        read = list(scored) if mode == "masked" else [True] * Q + list(scored)
        if not any(read):
            raise ValueError("no draft token is scored: keep at least one slot")
        shown = [mask_id] * d if mode == "masked" else list(draft)
        targets = list(draft) if mode == "masked" else prompt.query + list(draft)
        for i, c in enumerate(cs):
            tokens = prompt.prefix + c + prompt.query + shown
            first = {"masked": len(tokens) - d,  # the slots' own logits
                     "causal": P + len(c) - 1,  # row t - 1 predicts token t
                     "leave_one_out": P + len(c)}[mode]  # the positions masked one at a time
            jobs.append(DraftJob(b, i, tokens, first, targets, read))
    scores = [torch.empty(len(cs)) for cs in chunks]
    if mode == "leave_one_out":  # one row per (job, token read), batched across jobs of one length
        pairs = [(j, job.first + t) for j, job in enumerate(jobs) for t, r in enumerate(job.read) if r]
        logp = _leave_one_out_logp(model, [job.tokens for job in jobs], pairs, cfg.score_batch)
        per_job: list[list[torch.Tensor]] = [[] for _ in jobs]
        for (j, _), lp in zip(pairs, logp):
            per_job[j].append(lp)
        for job, lps in zip(jobs, per_job):
            scores[job.request][job.chunk] = torch.stack(lps).mean()
        return scores
    for ids in _batches([(len(job.tokens), job.first) for job in jobs], cfg.score_batch):
        group = [jobs[j] for j in ids]
        T, first, n = len(group[0].tokens), group[0].first, len(group[0].targets)
        idx = torch.tensor([job.tokens for job in group], device=dev)
        pos = torch.arange(T, device=dev).expand_as(idx)
        mask = None if mode == "masked" else torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        logits = model(idx, pos, mask=mask, logits_slice=slice(first, first + n)).float()  # (B, n, V)
        target = torch.tensor([job.targets for job in group], device=dev)
        logp = logits.log_softmax(dim=-1).gather(-1, target[..., None]).squeeze(-1).cpu()  # (B, n)
        for row, job in enumerate(group):  # each row its own request's slots read
            scores[job.request][job.chunk] = logp[row, torch.tensor(job.read)].mean()
    return scores


def score_chunks_draft(model, prompt: LongContextPrompt, chunks, draft, cfg: PrefillConfig,
                       scored: list[bool] | None = None) -> torch.Tensor:
    """The draft scores of one request's chunks (see score_requests_draft); ``scored`` defaults to all."""
    scored = [True] * len(draft) if scored is None else scored
    return score_requests_draft(model, [prompt], [chunks], [(draft, scored)], cfg)[0]


def _leave_one_out_logp(model, rows: list[list[int]], pairs: list[tuple[int, int]], batch: int) -> torch.Tensor:
    """log p(rows[j][a] | rows[j] with position a alone masked) for each (j, a) of ``pairs``:
    (len(pairs),). The pairs run ``batch`` per forward, full attention, positions 0..T-1, grouped
    by row length, whichever row they come from."""
    dev, logp = model.device, torch.empty(len(pairs))
    for g in _batches([len(rows[j]) for j, _ in pairs], batch):
        T, n = len(rows[pairs[g[0]][0]]), len(g)
        x = torch.tensor([rows[pairs[p][0]] for p in g], device=dev)
        cols = torch.tensor([pairs[p][1] for p in g], device=dev)
        target = x[torch.arange(n), cols]
        x[torch.arange(n), cols] = model.cfg.mask_id
        hidden = model(x, torch.arange(T, device=dev).expand(n, T), return_hidden=True)  # (n, T, C)
        logits = model.lm_head(hidden[torch.arange(n), cols]).float()  # (n, V)
        logp[g] = logits.log_softmax(dim=-1).gather(-1, target[:, None]).squeeze(1).cpu()
    return logp


# ---------------------------------------------------------------------------------------------
# 3. Top-K selection and 4. token sparsity
# ---------------------------------------------------------------------------------------------


def select_chunks(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k best chunks, in document order. Ties go to the earlier chunk; NaN scores
    rank last; k >= the number of chunks selects them all."""
    if k < 1:
        raise ValueError(f"top_k={k} must be >= 1")
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), i))
    return sorted(order[:k])


def keep_tokens(token_scores: torch.Tensor, capacity: int | None, has_bos: bool) -> torch.Tensor:
    """Offsets kept inside a chunk: the BOS (offset 0) always, then the highest-scored tokens, in order."""
    n = len(token_scores)
    if capacity is None or capacity >= n:
        return torch.arange(n)
    if capacity < 1 + has_bos:
        raise ValueError(f"token_capacity={capacity} leaves no room for tokens besides the BOS")
    start = 1 if has_bos else 0
    best = token_scores[start:].topk(capacity - start).indices + start
    head = torch.zeros(start, dtype=torch.long)
    return torch.cat([head, best]).sort().values


# ---------------------------------------------------------------------------------------------
# 5. Layout, positions and cache build
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """One request's rows in decoding order: tokens and positions of prefix | chunks | query | answer."""

    tokens: list[int]
    positions: list[int]
    chunk_spans: list[tuple[int, int]]  # (start, end) of each selected chunk in tokens
    query_start: int
    gen_start: int


def build_layout(prompt: LongContextPrompt, chunks, selected, kept, gen_length, mode, mask_id,
                 grid: int | None = None) -> Layout:
    """Where every kept token sits, and its position id under ``mode``.

    Each chunk takes as many positions as it has rows (``grid=None``), or exactly ``grid`` of
    them (the official code's Dream path, grid = chunk_size): continuous puts the k-th selected
    chunk at P + k * grid and the query at P + K * grid, reuse every chunk at P and the query at
    P + grid, absolute chunk i at P + i * grid and the query after the last chunk's slot, whatever
    the chunks' real lengths (a selected short last chunk leaves a gap).
    """
    P = len(prompt.prefix)
    span = [len(c) if grid is None else grid for c in chunks]  # positions each chunk takes
    tokens, positions, spans = list(prompt.prefix), list(range(P)), []
    packed = P  # continuous: next free position
    for i in selected:
        start = {"continuous": packed, "reuse": P, "absolute": P + sum(span[:i])}[mode]
        offsets = kept[i].tolist()
        spans.append((len(tokens), len(tokens) + len(offsets)))
        tokens += [chunks[i][o] for o in offsets]
        positions += [start + o for o in offsets]
        packed += span[i]
    q0 = {"continuous": packed, "reuse": P + max(span[i] for i in selected), "absolute": P + sum(span)}[mode]
    query_start = len(tokens)
    tokens += prompt.query + [mask_id] * gen_length
    positions += list(range(q0, q0 + len(prompt.query) + gen_length))
    return Layout(tokens, positions, spans, query_start, query_start + len(prompt.query))


class PoolWriter:
    """Plain self-attention over the forward's own tokens that also writes every layer's K/V into
    pool rows (B, T) of a ChunkKVCache: a segment encoded straight into the pool, no K/V copy kept."""

    def __init__(self, cache: ChunkKVCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows.reshape(-1)

    def attend(self, layer, q, k, v, mask=None, backend="sdpa"):
        self.cache.write(layer, self.rows, k, v)
        return dense_attention(q, k, v, mask, backend)


def _groups(keys) -> list[list[int]]:
    """Indices of equal keys together: the requests whose forwards can share one batch unpadded."""
    return list(_batches(keys, len(keys)))


def encode_prefixes(model, cache: ChunkKVCache, layouts: list[Layout], prefix_lengths: list[int]) -> list[torch.Tensor]:
    """chunk_query: every request's prefix encoded alone (one forward per prefix length), straight
    into fresh pool rows. Returns each request's prefix rows."""
    dev = model.device
    rows = [cache.allocate(P) for P in prefix_lengths]
    for group in _groups(prefix_lengths):
        P = prefix_lengths[group[0]]
        tokens = torch.tensor([layouts[b].tokens[:P] for b in group], device=dev)
        pos = torch.tensor([layouts[b].positions[:P] for b in group], device=dev)
        model(tokens, pos, cache=PoolWriter(cache, torch.stack([rows[b] for b in group])), stop_after=model.cfg.n_layers)
    return rows


def encode_chunk_query(model, cache: ChunkKVCache, prompt: LongContextPrompt, layout: Layout, window: int,
                       prefix_rows: torch.Tensor) -> torch.Tensor:
    """chunk_query: each chunk encoded against the (cached) prefix plus the last ``window`` query
    tokens, and only the chunk's rows kept. Returns the pool rows of the layout."""
    dev = model.device
    P = len(prompt.prefix)
    rows = torch.cat([prefix_rows, cache.allocate(len(layout.tokens) - P)])
    tail = prompt.query[-window:]
    scratch = cache.allocate(len(tail))
    tail_pos = layout.positions[layout.query_start : layout.query_start + len(tail)]
    for s, e in layout.chunk_spans:
        view = cache.view([torch.cat([rows[:P], rows[s:e], scratch])])
        view.set_write_rows(torch.cat([rows[s:e], scratch])[None])
        model(torch.tensor([layout.tokens[s:e] + tail], device=dev),
              torch.tensor([layout.positions[s:e] + tail_pos], device=dev), cache=view, stop_after=model.cfg.n_layers)
    return rows


def reuse_scored_chunks(model, cache: ChunkKVCache, keep: StreamedTopK, b: int, layout: Layout, selected, kept,
                        prefix_rows: torch.Tensor) -> torch.Tensor:
    """chunk_query, encoded once: a selected chunk's rows are the K/V its scoring forward computed
    (kept by StreamedTopK), no second encode. K was rotated at the position it was scored at
    (prefix length + offset); RoPE rotations compose, so rotating it by the difference puts it
    at its layout position. Returns the pool rows of the layout."""
    dev, P = model.device, len(prefix_rows)
    rows = [prefix_rows]
    for i, (s, e) in zip(selected, layout.chunk_spans):
        r = keep.rows(b, i)[kept[i].to(dev)]
        shift = torch.tensor(layout.positions[s:e]) - (P + kept[i])
        if shift.any():
            cos, sin = model.rope(shift[None].to(dev))
            for layer in range(model.cfg.n_layers):
                cache.k[layer][:, r] = apply_rope(cache.k[layer][:, r][None], cos, sin)[0]
        rows.append(r)
    rows.append(cache.allocate(len(layout.tokens) - layout.query_start))  # query + answer: filled at each block start
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------
# 6. The decoding method
# ---------------------------------------------------------------------------------------------


class Prefill:
    """Prefilling-dLLM as a sampler method (``generate(..., method="prefill", top_k=4, ...)``)."""

    name = "prefill"
    supports_cfg = False  # the pool holds one conditional layout per request, no unconditional rows

    def __init__(self, config: PrefillConfig | None = None, cuda_graphs: bool = True, **overrides):
        self.cfg = PrefillConfig(**overrides) if config is None else config
        self.cuda_graphs = cuda_graphs  # replay decode steps from a CUDA graph (on a GPU)
        self.graph: StepGraph | None = None
        self.stats: dict = {}
        self.selected: list[list[int]] = []  # per request, for inspection and the visualiser
        self.scores: list[torch.Tensor] = []
        self.chunk_lengths: list[list[int]] = []
        self.received = None  # a PrefillRecord to decode from instead of selecting (from_record)

    def begin(self, model, batch: Batch):
        if self.received is not None:
            return self.restore(model, batch)
        cfg, dev, G = self.cfg, model.device, batch.config.gen_length
        prompts = batch.prompts
        if not all(isinstance(p, LongContextPrompt) for p in prompts):
            raise TypeError("method 'prefill' needs LongContextPrompt prompts (prefix, context, query); "
                            "build them with Tokenizer.long_context_prompt")
        bos = model.cfg.bos_id if cfg.chunk_bos else None
        if cfg.chunk_bos and bos is None:
            raise ValueError("chunk_bos=True but the model config has no bos_id; set it or pass chunk_bos=False")
        self.graph = None  # a method object may be reused
        slots = batch.config.block_length if cfg.score_slots is None else cfg.score_slots
        synchronize(dev)
        t0 = time.perf_counter()
        chunks, kept, keep = self.select(model, prompts, bos, slots, G)  # steps 1-4, all requests together
        grid = cfg.chunk_size if cfg.position_grid == "chunk_size" else None
        layouts = [build_layout(p, c, sorted(k), k, G, cfg.positions, model.cfg.mask_id, grid)
                   for p, c, k in zip(prompts, chunks, kept)]
        synchronize(dev)
        t1 = time.perf_counter()
        self.build_cache(model, prompts, layouts, G, kept, keep)  # step 5; full_prompt_mask fills it at the first step
        synchronize(dev)
        self.stats = {"score_s": t1 - t0, "build_s": time.perf_counter() - t1, "reencode_s": 0.0,
                      "encode_once": keep is not None, "chunks": [len(c) for c in self.chunk_lengths],
                      "selected": self.selected, "kv_rows": [len(lay.tokens) for lay in layouts]}

    def encodes_once(self, model) -> bool:
        """Whether the scoring forward's K/V is the K/V the decode reads: chunk_query, attention
        scoring, every layer run. (full_prompt_mask re-encodes by definition; an early exit has
        no K/V for the later layers; draft scoring encodes the chunk with the draft, not the query.)"""
        cfg = self.cfg
        return (cfg.encode_once and cfg.cache_mode == "chunk_query" and cfg.score == "attention"
                and scoring_depth(model, cfg) == model.cfg.n_layers)

    def select(self, model, prompts, bos: int | None, slots: int, gen_length: int):
        """Chunk, score, keep the top K, and (optionally) the best tokens inside them, for every
        request of the batch through shared scoring forwards. Returns per request the chunks and
        {selected chunk: kept offsets}, and the StreamedTopK holding the chunks' K/V (encode once)."""
        cfg, mask_id = self.cfg, model.cfg.mask_id
        chunks = [split_chunks(p.context, cfg.chunk_size, bos, cfg.chunking) for p in prompts]
        keep = None
        if self.encodes_once(model):  # the pool: prefix + K chunk slots + query + answer per request
            rows = sum(len(p.prefix) + len(p.query) + gen_length for p in prompts)
            rows += sum(min(cfg.top_k, len(cs)) * max(map(len, cs)) for cs in chunks)
            keep = StreamedTopK(ChunkKVCache.for_model(model, rows), cfg.top_k, chunks)
        drafts = draft_answers(model, prompts, cfg) if cfg.score == "draft" else None

        def score(part):  # the scores of part[b], a list of request b's chunks, for every request
            if cfg.score == "attention":
                return score_requests_attention(model, prompts, part, cfg, slots, keep)
            return score_requests_draft(model, prompts, part, drafts, cfg)

        if cfg.chunk_parallel:  # each rank scores its share (balanced by tokens), then all-gather
            weights = [[len(p.prefix) + len(c) + len(p.query) for c in cs] for p, cs in zip(prompts, chunks)]
            scores, where = distributed.parallel_chunk_scores(score, chunks, weights)
        else:
            scores = score(chunks)
        selected = [select_chunks(s, cfg.top_k) for s in scores]
        if cfg.chunk_parallel and keep is not None:  # the selected chunks' K/V, from the ranks that scored them
            distributed.share_kept_kv(keep, selected, where)
        kept = [{i: torch.arange(len(cs[i])) for i in sel} for cs, sel in zip(chunks, selected)]
        if cfg.token_capacity is not None:
            jobs, owner = [], []
            for b, (p, cs, sel) in enumerate(zip(prompts, chunks, selected)):
                window = p.query[-cfg.token_query_window:] + [mask_id] * slots
                jobs += [ScoringJob(p.prefix, cs[i], window) for i in sel]
                owner += [(b, i) for i in sel]
            token_scores = attention_token_scores(model, jobs, range(model.cfg.n_layers), cfg.pool_kernel, cfg.score_batch)
            for (b, i), s in zip(owner, token_scores):
                kept[b][i] = keep_tokens(s, cfg.token_capacity, cfg.chunk_bos)
        self.selected, self.scores = selected, scores
        self.chunk_lengths = [[len(c) for c in cs] for cs in chunks]
        return chunks, kept, keep

    def build_cache(self, model, prompts, layouts, gen_length, kept=None, keep: StreamedTopK | None = None):
        """One pool for the whole batch; each request reads its own rows through the index."""
        dev, cq = model.device, self.cfg.cache_mode == "chunk_query"
        if keep is not None:
            self.cache = keep.cache
        else:
            scratch = max(len(p.query) for p in prompts) if cq else 0  # chunk_query's temporary query rows
            self.cache = ChunkKVCache.for_model(model, sum(len(lay.tokens) + scratch for lay in layouts))
        if not cq:
            self.rows = [self.cache.allocate(len(lay.tokens)) for lay in layouts]
        else:
            prefixes = encode_prefixes(model, self.cache, layouts, [len(p.prefix) for p in prompts])
            if keep is not None:
                self.rows = [reuse_scored_chunks(model, self.cache, keep, b, lay, sorted(kept[b]), kept[b], pre)
                             for b, (lay, pre) in enumerate(zip(layouts, prefixes))]
            else:
                self.rows = [encode_chunk_query(model, self.cache, p, lay, self.cfg.chunk_query_window, pre)
                             for p, lay, pre in zip(prompts, layouts, prefixes)]
        self._set_layouts(model, layouts, gen_length)

    def _set_layouts(self, model, layouts, gen_length):
        self.cache.set_index(self.rows)
        self.layouts, self.gen_length = layouts, gen_length
        self.tokens = [torch.tensor(lay.tokens, device=model.device) for lay in layouts]
        self.positions = [torch.tensor(lay.positions, device=model.device) for lay in layouts]
        self.positions_used = max(max(lay.positions) + 1 for lay in layouts)  # the sampler's trained-length check

    # Prefill-decode disaggregation (pdllm.distributed): the state ``begin`` leaves is one record.

    def record(self, model):
        """After ``begin``: layouts, pool rows and the pool's K/V as a PrefillRecord (chunk_query: the
        prefix and chunks are encoded; full_prompt_mask encodes at each block start: no K/V yet)."""
        from dataclasses import asdict

        used = self.cache.used if self.cfg.cache_mode == "chunk_query" else 0
        k, v = (t.transpose(1, 2)[:, :used] for t in (self.cache.k, self.cache.v))  # the storage's (L, rows, Hkv, D)
        return distributed.PrefillRecord(self.layouts, self.rows, k, v, self.cache.used, self.gen_length,
                                         asdict(self.cfg), distributed.model_shape(model), self.selected,
                                         self.scores, self.chunk_lengths, dict(self.stats))

    @classmethod
    def from_record(cls, record, cuda_graphs: bool = True) -> "Prefill":
        """A method whose ``begin`` takes the selection and cache of a PrefillRecord instead of making them."""
        method = cls(PrefillConfig(**record.config), cuda_graphs)
        method.received = record
        return method

    def restore(self, model, batch: Batch):
        rec = self.received
        rec.check_model(model)
        if len(batch.prompts) != len(rec.layouts) or batch.config.gen_length != rec.gen_length:
            raise ValueError(f"the prefill record holds {len(rec.layouts)} requests for gen_length={rec.gen_length}; "
                             f"decode it with its prompts (record.prompts()) and gen_length={rec.gen_length}")
        self.graph = None
        self.cache = ChunkKVCache.for_model(model, rec.pool_rows)
        for pool, sent in ((self.cache.k, rec.k), (self.cache.v, rec.v)):
            pool.transpose(1, 2)[:, : sent.shape[1]] = sent.to(model.device)
        self.cache.used = rec.pool_rows
        self.rows = [r.to(model.device) for r in rec.rows]
        self._set_layouts(model, rec.layouts, rec.gen_length)
        self.selected, self.scores, self.chunk_lengths = rec.selected, rec.scores, rec.chunk_lengths
        self.stats = {**rec.stats, "reencode_s": 0.0, "from_record": True}

    def _refresh(self, model, group, first, last):
        """Re-encode what a block start re-encodes, for requests of one shape in one forward
        (full_prompt_mask: everything kept; chunk_query: query + answer against the cached chunks).
        Returns logits (len(group), last - first, V) for answer rows [first, last)."""
        lay = self.layouts[group[0]]
        if self.cfg.cache_mode == "full_prompt_mask":
            tokens = torch.stack([self.tokens[b] for b in group])
            pos = torch.stack([self.positions[b] for b in group])
            writer = PoolWriter(self.cache, torch.stack([self.rows[b] for b in group]))
            return model(tokens, pos, cache=writer, logits_slice=slice(lay.gen_start + first, lay.gen_start + last))
        q0 = [self.layouts[b].query_start for b in group]
        view = self.cache.view([self.rows[b] for b in group])
        view.set_write_rows(torch.stack([self.rows[b][q:] for b, q in zip(group, q0)]))
        tokens = torch.stack([self.tokens[b][q:] for b, q in zip(group, q0)])
        pos = torch.stack([self.positions[b][q:] for b, q in zip(group, q0)])
        g0 = lay.gen_start - lay.query_start
        return model(tokens, pos, cache=view, logits_slice=slice(g0 + first, g0 + last))

    def block_logits(self, model, x, start, end, step):
        shift = model.cfg.logit_shift  # Dream: the row before each token predicts it
        P = x.shape[1] - self.gen_length  # where the answer starts in the sampler's x
        first, last = start - P - shift, end - P  # answer-relative rows to run (the whole block)
        if step == 0:  # the block start's re-encode, batched over requests of one shape, timed apart
            synchronize(x.device)
            t0 = time.perf_counter()
            for b, lay in enumerate(self.layouts):
                self.tokens[b][lay.gen_start :] = x[b, P:]
            full = self.cfg.cache_mode == "full_prompt_mask"
            shapes = [len(lay.tokens) if full else len(lay.tokens) - lay.query_start for lay in self.layouts]
            logits = [None] * len(self.layouts)
            for group in _groups(shapes):
                for b, rows in zip(group, self._refresh(model, group, first, last - shift)):
                    logits[b] = rows
            out = torch.stack(logits)
            synchronize(x.device)
            self.stats["reencode_s"] = self.stats.get("reencode_s", 0.0) + time.perf_counter() - t0
            self.slot0 = out[:, :1].clone()  # slot 0's logit of the block start (kept: slot0_logit)
            return out
        if shift and self.cfg.slot0_logit == "block_start":  # the official dual cache: the row before the
            # block keeps its block-start K/V, and its logit (slot 0's) is the block start's
            return torch.cat([self.slot0, self._cached_step(model, x, start, end, 0, end - start - 1)], dim=1)
        return self._cached_step(model, x, start, end, shift, end - start)

    def _cached_step(self, model, x, start, end, lead, n_logits):
        """Run x[:, start - lead : end] against the pool (their K/V rewritten in place); the logits
        of its first n_logits rows."""
        P = x.shape[1] - self.gen_length
        idx = x[:, start - lead : end]
        if self.graph is not None and self.graph.key == (start, end):
            return self.graph(idx)
        take = [slice(lay.gen_start + start - P - lead, lay.gen_start + end - P) for lay in self.layouts]
        cache = self.cache  # not self: a captured graph keeps `forward`, and self keeps the graph (a cycle)
        cache.set_write_rows(torch.stack([r[t] for r, t in zip(self.rows, take)]))
        pos = torch.stack([p[t] for p, t in zip(self.positions, take)])

        def forward(tokens):
            return model(tokens, pos, cache=cache, logits_slice=slice(0, n_logits))

        if self.cuda_graphs and graphs_available(x.device):
            self.graph = capture(forward, idx, key=(start, end))
            if self.graph is not None:
                return self.graph(idx)
        return forward(idx)
