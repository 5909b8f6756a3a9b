"""Step 1, chunking with BOS anchors: a request's context as spans (see stages.py).

Every chunk gets a BOS anchor in front, so each carries its own attention sink wherever it is
placed later (the method's first idea; ``chunk_bos=False`` turns the anchors off). A chunker is
called with the context's token ids and the anchor's id (None: no anchors) and returns contiguous
or overlapping spans, none empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdllm.prefill.stages import CHUNKERS, Span, Stage, at_least


def check_context(context: list[int]):
    if not context:
        raise ValueError("empty context: there is nothing to chunk")


@CHUNKERS.register
@dataclass(frozen=True)
class FixedChunks(Stage):
    """``bos_added``: consecutive pieces of chunk_size tokens (the last may be shorter), each led by
    a BOS row of its own (chunk_size + 1 rows): nothing is lost."""

    name = "bos_added"
    chunk_size: int = 1024

    def problems(self):
        return at_least(self, 1, "chunk_size")

    def __call__(self, context: list[int], bos_id: int | None) -> list[Span]:
        check_context(context)
        n, c = len(context), self.chunk_size
        return [Span(s, min(s + c, n), bos_id is not None) for s in range(0, n, c)]


@CHUNKERS.register
@dataclass(frozen=True)
class OfficialChunks(Stage):
    """``bos_in_chunk``, the official code's: the BOS is put in front of each piece of chunk_size
    tokens and the chunk cut back to chunk_size rows, so the last token of every full piece is
    dropped, never scored nor decoded; a piece that already starts with BOS gets none and keeps
    all its tokens."""

    name = "bos_in_chunk"
    chunk_size: int = 1024

    def problems(self):
        return at_least(self, 1, "chunk_size")

    def check(self, cfg):
        if cfg.chunk_bos and self.chunk_size < 2:
            return [f"chunking='bos_in_chunk' needs chunk_size >= 2 (the BOS takes one of its {self.chunk_size} rows)"]
        return []

    def __call__(self, context: list[int], bos_id: int | None) -> list[Span]:
        check_context(context)
        n, c = len(context), self.chunk_size
        spans = []
        for s in range(0, n, c):
            e = min(s + c, n)
            anchored = bos_id is not None and context[s] != bos_id
            spans.append(Span(s, min(e, s + c - 1) if anchored else e, anchored))
        return spans
