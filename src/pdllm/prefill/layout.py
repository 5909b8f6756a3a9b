"""Step 5a, the layout: where every kept row sits in the decode's sequence, and its position id.

The decode runs prefix | kept chunks | query | answer. Chunks move (only K of them are kept), so
their position ids are a choice (``positions``): ``continuous`` packs the kept chunks one after
another, ``reuse`` gives every chunk the positions it was encoded at (right after the prefix),
``absolute`` its original place in the BOS-anchored context (the chunks laid end to end).
``position_grid="chunk_size"`` gives every chunk exactly chunk_size positions whatever its
length, as the official code does for Dream.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdllm.tokenizer import LongContextPrompt

POSITION_MODES = ("continuous", "reuse", "absolute")
POSITION_GRIDS = ("lengths", "chunk_size")  # chunks take their real lengths | a chunk_size grid (official, Dream)


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

    ``chunks`` are the request's chunk rows, ``selected`` the kept ones in document order, and
    ``kept[i]`` the row offsets kept of chunk i (all of them without token sparsity). Each chunk
    takes as many positions as it has rows (``grid=None``), or exactly ``grid`` of them (the
    official code's Dream path, grid = chunk_size): continuous puts the k-th selected chunk at
    P + k * grid and the query at P + K * grid, reuse every chunk at P and the query at P + grid,
    whatever the chunks' real lengths (a selected short last chunk leaves a gap); absolute chunk i
    at P + i * grid and the query right after the last row kept of the last selected chunk (the
    official code's rule; without a grid the query follows the whole context, P + its rows).
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
    after = positions[-1] + 1 if grid is not None else P + sum(span)
    q0 = {"continuous": packed, "reuse": P + max(span[i] for i in selected), "absolute": after}[mode]
    query_start = len(tokens)
    tokens += prompt.query + [mask_id] * gen_length
    positions += list(range(q0, q0 + len(prompt.query) + gen_length))
    return Layout(tokens, positions, spans, query_start, query_start + len(prompt.query))
