"""Step 5b, the cache build: the kept rows encoded into the pool the decode reads.

* ``full_prompt_mask`` encodes prefix + kept chunks + query (+ the masked answer) jointly, at
  each block start: every row sees every other, as a dense prompt of the kept chunks would.
* ``chunk_query`` encodes each chunk once against the prefix and the last query tokens and
  reuses that K/V as is; the block start re-encodes query + answer against it. With a scorer that
  runs every layer (full-depth attention) the chunk was already encoded once, against the prefix,
  the query and the answer slots: then (``encode_once``) the decode reads that K/V, held for the
  best chunks while scoring (``KeptKV``), and no chunk is encoded a second time.

One ``ChunkKVCache`` holds the whole batch; each request reads its own rows through the index
(``Pool``). K is stored after RoPE, so a chunk moved to another position is rotated by the
difference (RoPE rotations compose).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdllm.attention import dense_attention
from pdllm.cache import ChunkKVCache
from pdllm.model import apply_rope
from pdllm.prefill.layout import Layout
from pdllm.prefill.scorers import batches
from pdllm.prefill.selectors import rank_key
from pdllm.prefill.stages import CACHE_BUILDERS, Chunked, Stage, at_least


@dataclass
class Pool:
    """The decode's memory for a batch: the pool, and per request its layout, the pool rows it
    reads (in layout order), and its tokens and positions on the device."""

    cache: ChunkKVCache
    layouts: list[Layout]
    rows: list[torch.Tensor]
    tokens: list[torch.Tensor] = field(init=False)
    positions: list[torch.Tensor] = field(init=False)

    def __post_init__(self):
        self.cache.set_index(self.rows)
        dev = self.cache.k.device
        self.tokens = [torch.tensor(lay.tokens, device=dev) for lay in self.layouts]
        self.positions = [torch.tensor(lay.positions, device=dev) for lay in self.layouts]


class PoolWriter:
    """Plain self-attention over the forward's own tokens that also writes every layer's K/V into
    pool rows (B, T) of a ChunkKVCache: a segment encoded straight into the pool, no K/V copy kept."""

    def __init__(self, cache: ChunkKVCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows.reshape(-1)

    def attend(self, layer, q, k, v, mask=None, backend="sdpa"):
        self.cache.write(layer, self.rows, k, v)
        return dense_attention(q, k, v, mask, backend)


def groups(keys) -> list[list[int]]:
    """Indices of equal keys together: the requests whose forwards can share one batch unpadded."""
    return list(batches(keys, len(keys)))


class KeptKV:
    """Encode once: each request's ``held`` best chunks so far with the K/V their scoring forward
    computed, in slots of pool rows, while the chunks stream through scoring. Holding every
    chunk's K/V until all are scored would cost O(context) memory; a chunk's K/V is copied into a
    slot only while it ranks among the best (selectors.score_order's order), so the chunks held at
    the end are the best ``held`` by score. Chunks the selection keeps but nobody held (another
    rank scored them, or the selector reached past the best) are ``put`` in afterwards.
    """

    def __init__(self, model, requests: list[Chunked], held: list[int]):
        slot_rows = [max(s.rows for s in r.spans) for r in requests]
        self.cache = ChunkKVCache.for_model(model, sum(h * n for h, n in zip(held, slot_rows)))
        self.slots = [[self.cache.allocate(n) for _ in range(h)] for h, n in zip(held, slot_rows)]
        self.held: list[dict[int, int]] = [{} for _ in requests]  # chunk -> slot, per request
        self.rank: list[dict[int, tuple]] = [{} for _ in requests]  # chunk -> its sort key
        self.lengths: list[dict[int, int]] = [{} for _ in requests]  # chunk -> its rows
        self.extra: list[dict[int, tuple]] = [{} for _ in requests]  # chunk -> (k, v) put in afterwards

    def offer(self, b: int, i: int, score: float, kv):
        """Chunk i of request b scored ``score``; ``kv()`` gives its K/V, layer by layer (Hkv, C, D)."""
        key = rank_key(score, i)
        held, rank = self.held[b], self.rank[b]
        if len(held) < len(self.slots[b]):
            slot = len(held)
        else:
            if not held:
                return
            worst = max(held, key=rank.__getitem__)
            if key >= rank[worst]:
                return
            slot = held.pop(worst)
            del rank[worst]
        layers = kv()
        held[i], rank[i], self.lengths[b][i] = slot, key, layers[0][0].shape[1]
        rows = self.slots[b][slot][: self.lengths[b][i]]
        for layer, (k, v) in enumerate(layers):
            self.cache.write(layer, rows, k[None], v[None])

    def holds(self, b: int, i: int) -> bool:
        return i in self.held[b] or i in self.extra[b]

    def put(self, b: int, i: int, k: torch.Tensor, v: torch.Tensor):
        """Chunk i's K/V (L, Hkv, C, D), from elsewhere."""
        self.extra[b][i] = (k, v)

    def kv(self, b: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk i's K/V of every layer, (L, Hkv, C, D) each, at the positions it was scored at."""
        if i in self.extra[b]:
            return self.extra[b][i]
        rows = self.slots[b][self.held[b][i]][: self.lengths[b][i]]
        return self.cache.k[:, :, rows], self.cache.v[:, :, rows]


def encode_prefixes(model, cache: ChunkKVCache, layouts: list[Layout], prefix_lengths: list[int]) -> list[torch.Tensor]:
    """chunk_query: every request's prefix encoded alone (one forward per prefix length), straight
    into fresh pool rows. Returns each request's prefix rows."""
    dev = model.device
    rows = [cache.allocate(P) for P in prefix_lengths]
    for group in groups(prefix_lengths):
        P = prefix_lengths[group[0]]
        tokens = torch.tensor([layouts[b].tokens[:P] for b in group], device=dev)
        pos = torch.tensor([layouts[b].positions[:P] for b in group], device=dev)
        model(tokens, pos, cache=PoolWriter(cache, torch.stack([rows[b] for b in group])), stop_after=model.cfg.n_layers)
    return rows


def encode_chunk_query(model, cache: ChunkKVCache, query: list[int], layout: Layout, window: int,
                       prefix_rows: torch.Tensor) -> torch.Tensor:
    """chunk_query: each chunk encoded against the (cached) prefix plus the last ``window`` query
    tokens, and only the chunk's rows kept. Returns the pool rows of the layout."""
    dev = model.device
    P = len(prefix_rows)
    rows = torch.cat([prefix_rows, cache.allocate(len(layout.tokens) - P)])
    tail = query[-window:]
    scratch = cache.allocate(len(tail))
    tail_pos = layout.positions[layout.query_start : layout.query_start + len(tail)]
    for s, e in layout.chunk_spans:
        view = cache.view([torch.cat([rows[:P], rows[s:e], scratch])])
        view.set_write_rows(torch.cat([rows[s:e], scratch])[None])
        model(torch.tensor([layout.tokens[s:e] + tail], device=dev),
              torch.tensor([layout.positions[s:e] + tail_pos], device=dev), cache=view, stop_after=model.cfg.n_layers)
    return rows


def reuse_scored_chunks(model, cache: ChunkKVCache, sink: KeptKV, b: int, layout: Layout, selected, kept,
                        prefix_rows: torch.Tensor) -> torch.Tensor:
    """chunk_query, encoded once: a selected chunk's rows are the K/V its scoring forward computed,
    no second encode. K was rotated at the position it was scored at (prefix length + offset);
    RoPE rotations compose, so rotating it by the difference puts it at its layout position.
    Returns the pool rows of the layout."""
    dev, P = model.device, len(prefix_rows)
    rows = [prefix_rows]
    for i, (s, e) in zip(selected, layout.chunk_spans):
        r = cache.allocate(e - s)
        k, v = sink.kv(b, i)
        offsets = kept[i].to(dev)
        k, v = k[:, :, offsets], v[:, :, offsets]
        shift = torch.tensor(layout.positions[s:e]) - (P + kept[i])
        if shift.any():
            cos, sin = model.rope(shift[None].to(dev))
            k = apply_rope(k, cos, sin)  # every layer at once: (L, Hkv, n, D), the layers as the batch
        cache.store(r, k, v)
        rows.append(r)
    rows.append(cache.allocate(len(layout.tokens) - layout.query_start))  # query + answer: filled at each block start
    return torch.cat(rows)


@CACHE_BUILDERS.register
@dataclass(frozen=True)
class FullPromptMask(Stage):
    """``full_prompt_mask``: prefix + kept chunks + query + answer encoded jointly at each block start."""

    name = "full_prompt_mask"

    def reads_scoring_kv(self) -> bool:
        return False

    def build(self, model, requests: list[Chunked], layouts: list[Layout], selected, kept, sink) -> Pool:
        cache = ChunkKVCache.for_model(model, sum(len(lay.tokens) for lay in layouts))
        return Pool(cache, layouts, [cache.allocate(len(lay.tokens)) for lay in layouts])  # filled at the first step

    def refresh_key(self, layout: Layout):
        return len(layout.tokens)

    def refresh(self, model, pool: Pool, group: list[int], first: int, last: int) -> torch.Tensor:
        """Re-encode everything kept for requests of one shape in one forward; logits
        (len(group), last - first, V) of answer rows [first, last)."""
        lay = pool.layouts[group[0]]
        tokens = torch.stack([pool.tokens[b] for b in group])
        pos = torch.stack([pool.positions[b] for b in group])
        writer = PoolWriter(pool.cache, torch.stack([pool.rows[b] for b in group]))
        return model(tokens, pos, cache=writer, logits_slice=slice(lay.gen_start + first, lay.gen_start + last))


@CACHE_BUILDERS.register
@dataclass(frozen=True)
class ChunkQuery(Stage):
    """``chunk_query``: each chunk encoded once against the prefix and the last
    ``chunk_query_window`` query tokens (or, ``encode_once``, its scoring forward's K/V reused)."""

    name = "chunk_query"
    chunk_query_window: int = 8  # each chunk is encoded with the last N query tokens
    encode_once: bool = True  # with a scorer that runs every layer: decode reads the scoring K/V

    def problems(self):
        return at_least(self, 1, "chunk_query_window")

    def reads_scoring_kv(self) -> bool:
        return self.encode_once

    def build(self, model, requests: list[Chunked], layouts: list[Layout], selected, kept, sink) -> Pool:
        scratch = 0 if sink is not None else max(len(r.prompt.query) for r in requests)  # the query tail's rows
        cache = ChunkKVCache.for_model(model, sum(len(lay.tokens) + scratch for lay in layouts))
        prefixes = encode_prefixes(model, cache, layouts, [len(r.prompt.prefix) for r in requests])
        if sink is not None:
            rows = [reuse_scored_chunks(model, cache, sink, b, lay, selected[b], kept[b], pre)
                    for b, (lay, pre) in enumerate(zip(layouts, prefixes))]
        else:
            rows = [encode_chunk_query(model, cache, r.prompt.query, lay, self.chunk_query_window, pre)
                    for r, lay, pre in zip(requests, layouts, prefixes)]
        return Pool(cache, layouts, rows)

    def refresh_key(self, layout: Layout):
        return len(layout.tokens) - layout.query_start

    def refresh(self, model, pool: Pool, group: list[int], first: int, last: int) -> torch.Tensor:
        """Re-encode query + answer against the cached chunks, for requests of one shape in one forward."""
        lay = pool.layouts[group[0]]
        q0 = [pool.layouts[b].query_start for b in group]
        view = pool.cache.view([pool.rows[b] for b in group])
        view.set_write_rows(torch.stack([pool.rows[b][q:] for b, q in zip(group, q0)]))
        tokens = torch.stack([pool.tokens[b][q:] for b, q in zip(group, q0)])
        pos = torch.stack([pool.positions[b][q:] for b, q in zip(group, q0)])
        g0 = lay.gen_start - lay.query_start
        return model(tokens, pos, cache=view, logits_slice=slice(g0 + first, g0 + last))
