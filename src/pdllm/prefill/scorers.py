"""Step 2, scoring: the attention scorer (pdllm's default) and the machinery every scorer that
reads attention shares (draft.py holds the other built-in scorer).

Each chunk is one local forward, prefix + [BOS + chunk] + query + [MASK] * slots, at positions
0..n-1; the chunks of every request of a batch share forwards, grouped by shape, ``score_batch``
at a time, so memory is O(chunk x score_batch) whatever the context length. A chunk's attention
score is the attention its query and answer-slot rows give its keys in the last ``score_layers``
layers (at or below ``score_depth``), max-pooled along tokens (SnapKV), summed over heads,
averaged over layers and tokens. The answer slots are where a diffusion model will decode the
answer, so their attention says where the answer is; the query's own rows attend to what the
question is about, not to where its answer sits (the official code scores the query rows alone:
``score_slots=0``). ``score_depth`` exits early: the forward stops after that many layers
(GemFilter's observation: early layers already find where the answer is).

A scorer that runs every layer can hand each chunk's K/V, as its forward computed them, to a
sink (cache_build.KeptKV): with ``cache_mode="chunk_query"`` the decode reads them and no chunk
is encoded a second time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdllm import fp8
from pdllm.attention import chunk_attention, dense_attention, key_attention_mass
from pdllm.prefill.stages import SCORERS, Chunked, Stage, at_least, scored


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

    def kv_of(self, row: int):
        """Batch row ``row``'s chunk K/V, layer by layer: (Hkv, L_chunk, D) pairs (views, no copy)."""
        return [(k[row], v[row]) for k, v in zip(self.k, self.v)]


def pool_tokens(mass: torch.Tensor, kernel: int) -> torch.Tensor:
    """SnapKV smoothing: max-pool (B, H, L) along L with a centred window, same length out."""
    kernel = min(kernel, mass.shape[-1])
    pooled = F.max_pool1d(mass, kernel, stride=1, padding=kernel // 2)
    return pooled[..., : mass.shape[-1]]


def batches(shapes, batch_size):
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


def scored_batches(model, jobs: list[ScoringJob], layers, pool_kernel: int, batch_size: int, keep_kv: bool = False,
                   linears=None):
    """Run the jobs' forwards batch_size at a time, grouped by shape, whichever request they come
    from; yield (job ids, pooled attention (n, L_chunk) mean over ``layers``, probe).

    Each forward is a local sequence of one chunk, so memory is O(chunk x batch_size) whatever the
    context, and it stops after the deepest layer read (early exit: no later layer, no head).
    """
    dev = model.device
    for ids in batches([j.shape for j in jobs], batch_size):
        P, C, Q = jobs[ids[0]].shape
        idx = torch.tensor([jobs[i].prefix + jobs[i].chunk + jobs[i].rows for i in ids], device=dev)
        pos = torch.arange(idx.shape[1], device=dev).expand_as(idx)
        probe = AttentionProbe(layers, slice(P + C, P + C + Q), slice(P, P + C), pool_kernel, keep_kv)
        model(idx, pos, cache=probe, stop_after=max(layers) + 1, linears=linears)
        yield ids, torch.stack(probe.token_scores).float().mean(dim=0), probe


def attention_token_scores(model, jobs: list[ScoringJob], layers, pool_kernel: int, batch_size: int) -> list[torch.Tensor]:
    """Per job, the pooled attention its rows give each token of its chunk, mean over layers."""
    scores: list[torch.Tensor | None] = [None] * len(jobs)
    for ids, per_token, _ in scored_batches(model, jobs, layers, pool_kernel, batch_size):
        per_token = per_token.cpu()
        for row, i in enumerate(ids):
            scores[i] = per_token[row]
    return scores


@SCORERS.register
@dataclass(frozen=True)
class AttentionScorer(Stage):
    """``attention``: chunk score = mean over its tokens of the pooled attention of the query and
    ``score_slots`` masked answer rows (None: the block length), in the last ``score_layers``
    layers at or below ``score_depth`` (None: every layer). One scoring forward per chunk batch,
    no draft to decode first."""

    name = "attention"
    score_layers: int = 4  # reads the last N layers at or below score_depth
    score_depth: int | None = None  # layers the scoring forward runs (early exit); None: all of them
    score_slots: int | None = None  # [MASK] answer slots scored with the query; None: the block length
    score_batch: int = 8  # chunks per scoring forward
    pool_kernel: int = 7  # max-pool width along tokens (SnapKV)
    score_fp8: bool = False  # the scoring forward's linear layers in FP8 (pdllm.fp8; attention stays bf16)

    def problems(self):
        out = at_least(self, 1, "score_layers", "score_batch", "pool_kernel")
        if self.score_depth is not None and self.score_depth < 1:
            out.append(f"score_depth={self.score_depth} must be >= 1 (or None: the full depth)")
        if self.score_slots is not None and self.score_slots < 0:
            out.append(f"score_slots={self.score_slots} must be >= 0")
        return out

    def depth(self, model) -> int:
        """How many layers the scoring forward runs: score_depth, or the model's full depth."""
        L = model.cfg.n_layers
        if self.score_depth is not None and self.score_depth > L:
            raise ValueError(f"score_depth={self.score_depth} is deeper than the model ({L} layers); use <= {L} or None")
        return L if self.score_depth is None else self.score_depth

    def provides_kv(self, model) -> bool:
        """Every layer runs, so every layer's K/V of each chunk can be kept (an early exit has none for
        the rest). With FP8 linear layers the scoring forward's K/V is not the decode's: none is offered
        while scoring, and the kept chunks are encoded again in the model's precision (``encode``)."""
        return self.depth(model) == model.cfg.n_layers

    def linears(self, model):
        """The scoring forward's linear layers: the FP8 copy (``score_fp8``), or None for the model's."""
        return fp8.model_weights(model) if self.score_fp8 else None

    def encode(self, model, requests: list[Chunked], block_length: int, sink) -> None:
        """The full-depth scoring forward of these chunks in the model's own precision, for their
        K/V (encode once, for kept chunks the sink did not hold): the K/V it gives the decode."""
        self.score(model, requests, block_length, sink, linears=None)

    def slots(self, block_length: int) -> int:
        return block_length if self.score_slots is None else self.score_slots

    def __call__(self, model, requests: list[Chunked], block_length: int, sink=None) -> list[torch.Tensor]:
        """(n_chunks,) fp32 per request; ``sink.offer`` takes each chunk's K/V as it is scored."""
        linears = self.linears(model)
        return self.score(model, requests, block_length, None if linears is not None else sink, linears)

    def jobs(self, model, requests: list[Chunked], block_length: int) -> tuple[list[ScoringJob], list[tuple]]:
        """Every chunk's scoring forward (prefix + chunk + query + answer slots) and its (request, chunk)."""
        rows_after = [model.cfg.mask_id] * self.slots(block_length)
        jobs, owner = [], []
        for b, r in enumerate(requests):
            jobs += [ScoringJob(r.prompt.prefix, c, r.prompt.query + rows_after) for c in r.chunks]
            owner += [(b, i) for i in range(len(r.chunks))]
        return jobs, owner

    def score(self, model, requests: list[Chunked], block_length: int, sink, linears) -> list[torch.Tensor]:
        depth = self.depth(model)
        layers = range(max(0, depth - self.score_layers), depth)
        jobs, owner = self.jobs(model, requests, block_length)
        scores = [torch.empty(len(r.chunks)) for r in requests]
        for ids, per_token, probe in scored_batches(model, jobs, layers, self.pool_kernel, self.score_batch,
                                                    sink is not None, linears):
            chunk_scores = per_token.mean(dim=1).cpu()
            scored(len(ids), len(jobs))
            for row, j in enumerate(ids):
                b, i = owner[j]
                scores[b][i] = chunk_scores[row]
                if sink is not None:
                    sink.offer(b, requests[b].ids[i], chunk_scores[row].item(), lambda row=row: probe.kv_of(row))
        return scores
