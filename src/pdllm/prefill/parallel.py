"""Chunk-parallel scoring (``PrefillConfig.chunk_parallel``, ``--chunk-parallel``) over
torch.distributed's ranks (pdllm.distributed, started by torchrun).

Every rank holds the model and scores a contiguous share of the batch's chunks, balanced by
tokens; the scores are all-gathered, so every rank selects the same chunks and decodes the same
answer. One process is the same code with a world of one. With encode-once, a kept chunk's K/V is
broadcast from the rank that scored (and held) it.
"""

from __future__ import annotations

import torch

from pdllm import distributed
from pdllm.prefill.cache_build import KeptKV
from pdllm.prefill.stages import Chunked


def score_across_ranks(scorer, model, requests: list[Chunked], block_length: int, sink: KeptKV | None):
    """This rank scores its token-balanced share of every request's chunks, then the scores are
    all-gathered: (n_chunks,) fp32 per request, the same on every rank (each a copy of the one its
    rank computed). Returns the scores and, per request and chunk, the rank that scored it."""
    flat = [(b, i) for b, r in enumerate(requests) for i in range(len(r.spans))]
    weights = [len(requests[b].prompt.prefix) + len(requests[b].chunks[i]) + len(requests[b].prompt.query)
               for b, i in flat]
    who = distributed.owners(weights, distributed.world_size())
    owner = [[0] * len(r.spans) for r in requests]
    for (b, i), r in zip(flat, who):
        owner[b][i] = r
    me = distributed.rank()
    mine = [r.share([i for i in range(len(r.spans)) if owner[b][i] == me]) for b, r in enumerate(requests)]
    local = scorer(model, mine, block_length, sink)
    at = {(b, i): j for j, (b, i) in enumerate(flat)}
    vector = torch.zeros(len(flat))
    for b, (part, s) in enumerate(zip(mine, local)):
        for i, score in zip(part.ids, s):
            vector[at[b, i]] = score
    gathered = distributed.all_gather_tensor(vector, "chunk-parallel scoring (all-gather of the chunk scores)")
    scores = [torch.empty(len(r.spans)) for r in requests]
    for j, (b, i) in enumerate(flat):
        scores[b][i] = gathered[who[j]][j]
    return scores, owner


def share_kept_kv(sink: KeptKV, requests: list[Chunked], selected: list[list[int]], owner: list[list[int]]):
    """Encode once across ranks: a selected chunk's K/V (its scoring forward's) is in the sink of
    the rank that scored it, if that rank held it. Broadcast each held one from its rank and put
    it in every other rank's sink; one nobody held stays missing (encoded again on every rank)."""
    if distributed.world_size() == 1:
        return
    me = distributed.rank()
    mine = [[i for i in sel if sink.holds(b, i)] for b, sel in enumerate(selected)]
    held = distributed.all_gather_json(mine, "chunk-parallel scoring (which rank holds each kept chunk's K/V)")
    L, Hkv, _, D = sink.cache.k.shape
    for b, sel in enumerate(selected):
        for i in sel:
            holders = [r for r, h in enumerate(held) if i in h[b]]
            if not holders:
                continue
            src = owner[b][i] if owner[b][i] in holders else holders[0]
            if src == me:
                k, v = sink.kv(b, i)
                kv = torch.stack([k, v])
            else:
                kv = torch.empty((2, L, Hkv, len(requests[b].chunks[i]), D), dtype=sink.cache.k.dtype,
                                 device=sink.cache.k.device)
            kv = distributed.broadcast_tensor(kv, src, f"chunk-parallel scoring (broadcast of chunk {i}'s K/V "
                                                       f"from rank {src})")
            if src != me:
                sink.put(b, i, kv[0], kv[1])
