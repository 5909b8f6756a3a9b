"""Prefilling-dLLM: chunked prefilling with BOS anchors, chunk scoring, top-K selection, token
sparsity, and decoding against the selected chunks' KV (arXiv 2606.10537).

The method, in the order it runs (``Prefill.begin``):

1. **Chunking with BOS anchors.** The context is split into chunks of ``chunk_size`` tokens and a
   BOS token is put in front of every chunk, so each chunk carries its own attention sink.
2. **Scoring**, once, streamed chunk by chunk (memory O(chunk) whatever the context length):
   ``attention``: each chunk is encoded with the prefix, the query and the masked answer slots
   (prefix + [BOS + chunk] + query + [MASK] * n); the attention of the query and answer-slot rows
   to the chunk's keys in the last layers, max-pooled along tokens, summed over heads, averaged
   over layers and tokens, is the chunk's score. The answer slots are where a diffusion model will
   decode the answer, so their attention says where the answer is (the official code scores the
   query rows alone: ``score_slots=0``; on our toy model that finds the passkey's chunk in the
   top 4 for 2 of 10 examples, with 16 slots for 10 of 10). ``score_depth`` exits early: the
   scoring forward runs that many layers and reads the last ``score_layers`` of them (GemFilter).
   ``draft``: a short draft answer is decoded from prefix + query alone; a chunk's score is how
   likely it makes the draft: the mean log-probability of the draft tokens given prefix + [BOS +
   chunk] + query (masked likelihood for a bidirectional model like LLaDA, next-token
   likelihood of query + draft under a causal mask for an AR-initialised model like Dream).
3. **Top-K selection**: the K best chunks, kept in document order.
4. **Token sparsity** (optional): inside each selected chunk keep the ``token_capacity`` tokens the
   query attends to most (SnapKV-style pooling), the BOS anchor always.
5. **Cache build**: ``full_prompt_mask`` re-encodes prefix + selected chunks + query (+ the masked
   answer) jointly; ``chunk_query`` encodes each chunk once against the prefix and the last query
   tokens and reuses that KV as is. Positions: ``continuous`` (selected chunks packed one after
   another), ``reuse`` (the positions each chunk had when encoded), ``absolute`` (its original
   place in the BOS-anchored context).
6. **Decoding**: the sampler's steps run the answer block against the pool of prefix + selected
   chunks + query + answer (``ChunkKVCache``), through the Triton kernel on a GPU.

With ``chunk_bos=False``, every chunk selected, ``full_prompt_mask`` and ``absolute`` positions,
this is exactly the dense dual cache (tests/test_prefill.py proves it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pdllm.attention import chunk_attention, dense_attention, key_attention_mass
from pdllm.cache import ChunkKVCache, KVRecorder
from pdllm.graphs import StepGraph, capture, graphs_available
from pdllm.official import confidence_draft
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
    positions: str = "continuous"
    position_grid: str = "lengths"  # see POSITION_GRIDS and build_layout

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
                     position_grid="chunk_size" if dream else "lengths")
        return cls(**{**knobs, **overrides})

    def __post_init__(self):
        problems = []
        if self.chunk_size < 1:
            problems.append(f"chunk_size={self.chunk_size} must be >= 1")
        if self.chunking == "bos_in_chunk" and self.chunk_bos and self.chunk_size < 2:
            problems.append(f"chunking='bos_in_chunk' needs chunk_size >= 2 (the BOS takes one of its {self.chunk_size} rows)")
        if self.top_k < 1:
            problems.append(f"top_k={self.top_k} must be >= 1 (use a K >= the number of chunks to keep all)")
        for name, value, allowed in (("score", self.score, SCORE_MODES), ("cache_mode", self.cache_mode, CACHE_MODES),
                                     ("positions", self.positions, POSITION_MODES),
                                     ("draft_likelihood", self.draft_likelihood, DRAFT_LIKELIHOODS),
                                     ("draft_decoder", self.draft_decoder, DRAFT_DECODERS),
                                     ("draft_scored", self.draft_scored, ("all", "confirmed")),
                                     ("chunking", self.chunking, CHUNKINGS),
                                     ("position_grid", self.position_grid, POSITION_GRIDS)):
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


def split_chunks(context: list[int], chunk_size: int, bos_id: int | None, chunking: str = "bos_added") -> list[list[int]]:
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
    all keys; second pass: each chunk key's share), so no attention matrix is materialised.
    """

    def __init__(self, layers, query_rows: slice, key_rows: slice, pool_kernel: int):
        self.layers, self.query_rows, self.key_rows, self.pool_kernel = set(layers), query_rows, key_rows, pool_kernel
        self.token_scores: list[torch.Tensor] = []  # one (B, L_chunk) fp32 per probed layer

    def attend(self, layer, q, k, v, mask=None, backend="sdpa"):
        out = dense_attention(q, k, v, mask, backend)
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


def _batches(chunks, batch_size):
    """Chunk indices grouped by length (so no padding is needed), in batches."""
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        by_len.setdefault(len(c), []).append(i)
    for ids in by_len.values():
        for j in range(0, len(ids), batch_size):
            yield ids[j : j + batch_size]


def attention_token_scores(model, prefix, chunks, query, layers, pool_kernel, batch_size) -> list[torch.Tensor]:
    """Per chunk, the pooled attention the query rows give each of its tokens, mean over layers.

    Each chunk is encoded as prefix + chunk + query with positions 0..n-1 (its own local
    forward), so memory stays O(chunk) for any context length. The forward stops after the
    deepest layer read (early exit): no later layer, no final norm or head.
    """
    dev, P, Q = model.device, len(prefix), len(query)
    scores: list[torch.Tensor | None] = [None] * len(chunks)
    for ids in _batches(chunks, batch_size):
        C = len(chunks[ids[0]])
        idx = torch.tensor([prefix + chunks[i] + query for i in ids], device=dev)
        pos = torch.arange(idx.shape[1], device=dev).expand_as(idx)
        probe = AttentionProbe(layers, slice(P + C, P + C + Q), slice(P, P + C), pool_kernel)
        model(idx, pos, cache=probe, stop_after=max(layers) + 1)
        per_token = torch.stack(probe.token_scores).mean(dim=0)  # (B, C)
        for row, i in enumerate(ids):
            scores[i] = per_token[row].float().cpu()
    return scores


def scoring_depth(model, cfg: PrefillConfig) -> int:
    """How many layers the scoring forward runs: cfg.score_depth, or the model's full depth."""
    L = model.cfg.n_layers
    if cfg.score_depth is not None and cfg.score_depth > L:
        raise ValueError(f"score_depth={cfg.score_depth} is deeper than the model ({L} layers); use <= {L} or None")
    return L if cfg.score_depth is None else cfg.score_depth


def score_chunks_attention(model, prompt: LongContextPrompt, chunks, cfg: PrefillConfig, slots: int = 0) -> torch.Tensor:
    """Chunk score = mean over its tokens of the pooled attention of the query and ``slots``
    masked answer rows, in the last cfg.score_layers layers at or below cfg.score_depth (GemFilter's
    observation: early layers already find where the answer is, at a fraction of the forward)."""
    depth = scoring_depth(model, cfg)
    layers = range(max(0, depth - cfg.score_layers), depth)
    rows = prompt.query + [model.cfg.mask_id] * slots
    per_token = attention_token_scores(model, prompt.prefix, chunks, rows, layers, cfg.pool_kernel, cfg.score_batch)
    return torch.stack([s.mean() for s in per_token])


def draft_answer(model, prompt: LongContextPrompt, cfg: PrefillConfig) -> tuple[list[int], list[bool]]:
    """A short draft answer from prefix + query alone (no context), decoded greedily, and which of
    its slots the scores read (``cfg.draft_scored``).

    ``sampler``: pdllm's vanilla sampler over prefix + query + [MASK] * n, one slot per step.
    ``confidence``: the official procedure (``pdllm.official.confidence_draft``): the prompt
    encoded alone, the slots against its KV, slot 0 from its logit, then ``draft_rounds`` rounds of
    the single most confident slot, or until full by ``draft_threshold``; unconfirmed slots stay
    [MASK] in the draft.
    """
    n, ids = cfg.draft_tokens, prompt.prefix + prompt.query
    if cfg.draft_decoder == "sampler":
        gc = GenerationConfig(gen_length=n, block_length=n, steps=n)
        draft, confirmed = generate(model, [ids], gc, method=Vanilla()).tokens[0].tolist(), [True] * n
    else:
        draft, confirmed = confidence_draft(model, ids, n, cfg.draft_rounds, cfg.draft_threshold, cfg.draft_draws_mask)
    return draft, confirmed if cfg.draft_scored == "confirmed" else [True] * n


def score_chunks_draft(model, prompt: LongContextPrompt, chunks, draft, cfg: PrefillConfig,
                       scored: list[bool] | None = None) -> torch.Tensor:
    """Chunk score = mean log-probability of the draft (higher = the chunk supports the answer).

    ``masked`` (bidirectional models, LLaDA): the draft slots are [MASK]; score the true draft
    token at each slot — the masked-diffusion likelihood. ``causal`` (AR-initialised, Dream): a
    causal mask, and the log-probability of every query and draft token given what precedes it.
    ``leave_one_out`` (the official code's LLaDA score): every query and draft token scored with
    itself alone masked, full attention, one row per token. ``scored`` (default all) says which
    draft slots count; the others stay in the row as they are (official: [MASK]) and are not read.
    """
    mode = cfg.draft_likelihood or ("causal" if model.cfg.logit_shift else "masked")
    dev, mask_id, P, Q, d = model.device, model.cfg.mask_id, len(prompt.prefix), len(prompt.query), len(draft)
    scored = [True] * d if scored is None else list(scored)
    keep = torch.tensor(scored if mode == "masked" else [True] * Q + scored, device=dev)  # columns read
    if not keep.any():
        raise ValueError("no draft token is scored: keep at least one slot")
    scores = torch.empty(len(chunks))
    for ids in _batches(chunks, cfg.score_batch):
        C = len(chunks[ids[0]])
        shown = [mask_id] * d if mode == "masked" else draft
        idx = torch.tensor([prompt.prefix + chunks[i] + prompt.query + shown for i in ids], device=dev)
        T = idx.shape[1]
        pos = torch.arange(T, device=dev).expand_as(idx)
        target = torch.tensor(draft, device=dev)
        if mode == "leave_one_out":
            scores[ids] = _leave_one_out_logp(model, idx, keep.nonzero().squeeze(1) + P + C, cfg.score_batch).mean(1).cpu()
            continue
        if mode == "masked":
            logits = model(idx, pos, logits_slice=slice(T - d, T)).float()  # (B, d, V)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            logits = model(idx, pos, mask=causal, logits_slice=slice(P + C - 1, T - 1)).float()
            target = torch.cat([torch.tensor(prompt.query, device=dev), target])
        logp = logits.log_softmax(dim=-1).gather(-1, target.expand(len(ids), -1)[..., None]).squeeze(-1)
        scores[ids] = logp[:, keep].mean(dim=1).cpu()
    return scores


def _leave_one_out_logp(model, idx: torch.Tensor, at: torch.Tensor, batch: int) -> torch.Tensor:
    """log p(idx[b, a] | idx[b] with position a alone masked) for every row b and a in ``at``: (B, len(at)).
    The (row, position) pairs run ``batch`` per forward, full attention, positions 0..T-1."""
    B, T = idx.shape
    pairs = torch.cartesian_prod(torch.arange(B, device=idx.device), at)  # (B * A, 2): row, masked position
    logp = torch.empty(len(pairs), device=idx.device)
    for g in range(0, len(pairs), batch):
        rows, cols = pairs[g : g + batch].unbind(1)
        n = len(rows)
        x = idx[rows].clone()
        x[torch.arange(n), cols] = model.cfg.mask_id
        hidden = model(x, torch.arange(T, device=idx.device).expand(n, T), return_hidden=True)  # (n, T, C)
        logits = model.lm_head(hidden[torch.arange(n), cols]).float()  # (n, V)
        logp[g : g + n] = logits.log_softmax(dim=-1).gather(-1, idx[rows, cols][:, None]).squeeze(1)
    return logp.view(B, len(at))


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


def encode_chunk_query(model, cache: ChunkKVCache, prompt: LongContextPrompt, layout: Layout, window: int):
    """chunk_query: prefix encoded alone; each chunk encoded against the prefix plus the last
    ``window`` query tokens, and only the chunk's rows kept. Returns the pool rows of the layout."""
    dev = model.device
    rows = cache.allocate(len(layout.tokens))
    P = len(prompt.prefix)
    rec = KVRecorder()
    model(torch.tensor([layout.tokens[:P]], device=dev), torch.tensor([layout.positions[:P]], device=dev),
          cache=rec, logits_slice=slice(0, 0))
    k, v = rec.stacked()
    cache.store(rows[:P], k[:, 0], v[:, 0])
    tail = prompt.query[-window:]
    scratch = cache.allocate(len(tail))
    tail_pos = layout.positions[layout.query_start : layout.query_start + len(tail)]
    for s, e in layout.chunk_spans:
        view = cache.view([torch.cat([rows[:P], rows[s:e], scratch])])
        view.set_write_rows(torch.cat([rows[s:e], scratch])[None])
        model(torch.tensor([layout.tokens[s:e] + tail], device=dev),
              torch.tensor([layout.positions[s:e] + tail_pos], device=dev), cache=view, logits_slice=slice(0, 0))
    return rows


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

    def begin(self, model, batch: Batch):
        cfg, dev, G = self.cfg, model.device, batch.config.gen_length
        prompts = batch.prompts
        if not all(isinstance(p, LongContextPrompt) for p in prompts):
            raise TypeError("method 'prefill' needs LongContextPrompt prompts (prefix, context, query); "
                            "build them with Tokenizer.long_context_prompt")
        bos = model.cfg.bos_id if cfg.chunk_bos else None
        if cfg.chunk_bos and bos is None:
            raise ValueError("chunk_bos=True but the model config has no bos_id; set it or pass chunk_bos=False")
        self.graph, self.selected, self.scores, self.chunk_lengths = None, [], [], []  # a method object may be reused
        slots = batch.config.block_length if cfg.score_slots is None else cfg.score_slots
        synchronize(dev)
        t0 = time.perf_counter()
        layouts = []
        for prompt in prompts:  # steps 1-4, one request at a time (each has its own chunks)
            chunks, kept = self.select(model, prompt, bos, slots)
            grid = cfg.chunk_size if cfg.position_grid == "chunk_size" else None
            layouts.append(build_layout(prompt, chunks, sorted(kept), kept, G, cfg.positions, model.cfg.mask_id, grid))
        synchronize(dev)
        t1 = time.perf_counter()
        self.build_cache(model, prompts, layouts, G)  # step 5; full_prompt_mask fills it at the first step
        synchronize(dev)
        self.stats = {"score_s": t1 - t0, "build_s": time.perf_counter() - t1,
                      "chunks": [len(c) for c in self.chunk_lengths], "selected": self.selected,
                      "kv_rows": [len(lay.tokens) for lay in layouts]}

    def select(self, model, prompt: LongContextPrompt, bos: int | None, slots: int):
        """Chunk, score, keep the top K, and (optionally) the best tokens inside them.
        Returns the chunks and {selected chunk: kept offsets}."""
        cfg = self.cfg
        chunks = split_chunks(prompt.context, cfg.chunk_size, bos, cfg.chunking)
        if cfg.score == "attention":
            scores = score_chunks_attention(model, prompt, chunks, cfg, slots)
        else:
            draft, scored = draft_answer(model, prompt, cfg)
            scores = score_chunks_draft(model, prompt, chunks, draft, cfg, scored)
        selected = select_chunks(scores, cfg.top_k)
        kept = {i: torch.arange(len(chunks[i])) for i in selected}
        if cfg.token_capacity is not None:
            window = prompt.query[-cfg.token_query_window:] + [model.cfg.mask_id] * slots
            token_scores = attention_token_scores(model, prompt.prefix, [chunks[i] for i in selected], window,
                                                  range(model.cfg.n_layers), cfg.pool_kernel, cfg.score_batch)
            kept = {i: keep_tokens(s, cfg.token_capacity, cfg.chunk_bos) for i, s in zip(selected, token_scores)}
        self.selected.append(selected)
        self.scores.append(scores)
        self.chunk_lengths.append([len(c) for c in chunks])
        return chunks, kept

    def build_cache(self, model, prompts, layouts, gen_length):
        """One pool for the whole batch; each request reads its own rows through the index."""
        dev, cq = model.device, self.cfg.cache_mode == "chunk_query"
        scratch = max(len(p.query) for p in prompts) if cq else 0  # chunk_query's temporary query rows
        self.cache = ChunkKVCache.for_model(model, sum(len(lay.tokens) + scratch for lay in layouts))
        self.rows = [encode_chunk_query(model, self.cache, p, lay, self.cfg.chunk_query_window) if cq
                     else self.cache.allocate(len(lay.tokens)) for p, lay in zip(prompts, layouts)]
        self.cache.set_index(self.rows)
        self.layouts, self.gen_length = layouts, gen_length
        self.tokens = [torch.tensor(lay.tokens, device=dev) for lay in layouts]
        self.positions = [torch.tensor(lay.positions, device=dev) for lay in layouts]

    def _refresh(self, model, b, answer, first, last):
        """Re-encode what a block start re-encodes (full_prompt_mask: everything kept; chunk_query:
        query + answer against the cached chunks). Returns logits for answer rows [first, last)."""
        lay, rows, dev = self.layouts[b], self.rows[b], model.device
        self.tokens[b][lay.gen_start :] = answer
        if self.cfg.cache_mode == "full_prompt_mask":
            rec = KVRecorder()
            logits = model(self.tokens[b][None], self.positions[b][None], cache=rec,
                           logits_slice=slice(lay.gen_start + first, lay.gen_start + last))
            k, v = rec.stacked()
            self.cache.store(rows, k[:, 0], v[:, 0])
            return logits
        q0 = lay.query_start
        view = self.cache.view([rows])
        view.set_write_rows(rows[q0:][None])
        return model(self.tokens[b][None, q0:], self.positions[b][None, q0:], cache=view,
                     logits_slice=slice(lay.gen_start - q0 + first, lay.gen_start - q0 + last))

    def block_logits(self, model, x, start, end, step):
        shift = model.cfg.logit_shift  # Dream: the row before each token predicts it
        P = x.shape[1] - self.gen_length  # where the answer starts in the sampler's x
        first, last = start - P - shift, end - P  # answer-relative rows to run (the whole block)
        if step == 0:
            return torch.cat([self._refresh(model, b, x[b, P:], first, last - shift) for b in range(x.shape[0])])
        idx = x[:, start - shift : end]
        if self.graph is not None and self.graph.key == (start, end):
            return self.graph(idx)
        take = [slice(lay.gen_start + first, lay.gen_start + last) for lay in self.layouts]
        cache = self.cache  # not self: a captured graph keeps `forward`, and self keeps the graph (a cycle)
        cache.set_write_rows(torch.stack([r[t] for r, t in zip(self.rows, take)]))
        pos = torch.stack([p[t] for p, t in zip(self.positions, take)])

        def forward(tokens):
            return model(tokens, pos, cache=cache, logits_slice=slice(0, end - start))

        if self.cuda_graphs and graphs_available(x.device):
            self.graph = capture(forward, idx, key=(start, end))
            if self.graph is not None:
                return self.graph(idx)
        return forward(idx)
