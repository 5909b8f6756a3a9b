"""Step 3, selection: which spans the decode keeps, from their scores; and step 4, token sparsity
inside the kept chunks.

A selector returns the indices of the kept spans, in document order, any number of them. It also
says how many of the best-scored chunks are worth holding while scoring streams (``held``): with
encode-once, the scorer's K/V of those chunks is kept, so a selector whose choice lies within its
``held`` best needs no chunk encoded again (top-K: exactly its K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdllm.prefill.scorers import ScoringJob, attention_token_scores
from pdllm.prefill.stages import SELECTORS, Chunked, Span, Stage


def rank_key(score: float, i: int) -> tuple:
    """The sort key of chunk i: higher score first, then the earlier chunk; NaN (and -inf) last. One
    rule for a whole tensor of scores (score_order) and for orders built as scores arrive (KeptKV)."""
    return (float("inf") if score != score else -score, i)


def score_order(scores: torch.Tensor) -> list[int]:
    """Chunk indices best first, by rank_key."""
    values = scores.float().tolist()
    return sorted(range(len(values)), key=lambda i: rank_key(values[i], i))


def select_chunks(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k best chunks, in document order. Ties go to the earlier chunk; NaN scores
    rank last; k >= the number of chunks selects them all."""
    if k < 1:
        raise ValueError(f"top_k={k} must be >= 1")
    return sorted(score_order(scores)[:k])


@SELECTORS.register
@dataclass(frozen=True)
class TopK(Stage):
    """``top_k``: the K best chunks, kept in document order (K >= the number of chunks keeps all)."""

    name = "top_k"
    top_k: int = 4

    def problems(self):
        if self.top_k < 1:
            return [f"top_k={self.top_k} must be >= 1 (use a K >= the number of chunks to keep all)"]
        return []

    def held(self, n_chunks: int) -> int:
        return min(self.top_k, n_chunks)

    def __call__(self, scores: torch.Tensor, r: Chunked) -> list[int]:
        return select_chunks(scores, self.top_k)


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


def sparsify_tokens(model, requests: list[Chunked], selected: list[list[int]], capacity: int, anchored: bool,
                    window: int, slots: int, pool_kernel: int, batch_size: int) -> list[dict[int, torch.Tensor]]:
    """Token sparsity (SnapKV-style): inside each selected chunk keep the ``capacity`` rows that the
    last ``window`` query tokens and the answer slots attend to most over all layers, and the
    chunk's first row when the chunks are ``anchored`` (its BOS). Returns per request {selected
    chunk: kept row offsets}."""
    jobs, owner = [], []
    for b, (r, sel) in enumerate(zip(requests, selected)):
        rows = r.prompt.query[-window:] + [model.cfg.mask_id] * slots
        jobs += [ScoringJob(r.prompt.prefix, r.chunks[i], rows) for i in sel]
        owner += [(b, i) for i in sel]
    token_scores = attention_token_scores(model, jobs, range(model.cfg.n_layers), pool_kernel, batch_size)
    kept: list[dict[int, torch.Tensor]] = [{} for _ in requests]
    for (b, i), s in zip(owner, token_scores):
        kept[b][i] = keep_tokens(s, capacity, anchored)
    return kept


def widen(r: Chunked, selected: list[int], margin: int, bos_id: int | None) -> Chunked:
    """The selected chunks with ``margin`` more context tokens on each side (clipped to the
    context), merged where they then overlap or touch: the chunks the decode keeps. A fact that a
    boundary cut, whose selected half is within ``margin`` tokens of its other half, is kept whole."""
    n = len(r.prompt.context)
    spans: list[Span] = []
    for i in sorted(selected, key=lambda i: r.spans[i].start):
        s = r.spans[i]
        start, end = max(0, s.start - margin), min(n, s.end + margin)
        if spans and start <= spans[-1].end:
            last = spans.pop()
            start, end, bos = last.start, max(end, last.end), last.bos or s.bos
        else:
            bos = s.bos
        spans.append(Span(start, end, bos))
    return Chunked.of(r.prompt, spans, bos_id)
