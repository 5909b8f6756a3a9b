"""Step 1, chunking with BOS anchors: a request's context as spans (see stages.py).

Every chunk gets a BOS anchor in front, so each carries its own attention sink wherever it is
placed later (the method's first idea; ``chunk_bos=False`` turns the anchors off). A chunker is
called with the request's prompt (its ``context`` ids, and ``breaks`` where the tokenizer gave the
text's structure) and the anchor's id (None: no anchors), and returns spans of the context in
order, contiguous or overlapping, none empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdllm.boundaries import snapped_spans
from pdllm.prefill.stages import CHUNKERS, Span, Stage, at_least
from pdllm.tokenizer import LongContextPrompt


def check_context(context: list[int]):
    if not context:
        raise ValueError("empty context: there is nothing to chunk")
    return context


@CHUNKERS.register
@dataclass(frozen=True)
class FixedChunks(Stage):
    """``bos_added``: consecutive pieces of chunk_size tokens (the last may be shorter), each led by
    a BOS row of its own (chunk_size + 1 rows): nothing is lost."""

    name = "bos_added"
    chunk_size: int = 1024

    def problems(self):
        return at_least(self, 1, "chunk_size")

    def __call__(self, prompt: LongContextPrompt, bos_id: int | None) -> list[Span]:
        n, c = len(check_context(prompt.context)), self.chunk_size
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

    def __call__(self, prompt: LongContextPrompt, bos_id: int | None) -> list[Span]:
        context = check_context(prompt.context)
        n, c = len(context), self.chunk_size
        spans = []
        for s in range(0, n, c):
            e = min(s + c, n)
            anchored = bos_id is not None and context[s] != bos_id
            spans.append(Span(s, min(e, s + c - 1) if anchored else e, anchored))
        return spans


@CHUNKERS.register
@dataclass(frozen=True)
class OverlappingChunks(Stage):
    """``overlap``: the fixed chunks, each reaching ``chunk_overlap`` tokens into its neighbours on
    both sides (chunk_size + 2 * chunk_overlap tokens, and the anchor). A fact no longer than the
    overlap that a fixed boundary would cut lies whole in one of the two chunks around the
    boundary, so it is scored whole and kept whole; scoring and the kept rows grow by
    (chunk_size + 2 * chunk_overlap) / chunk_size."""

    name = "overlap"
    chunk_size: int = 1024
    chunk_overlap: int = 16  # tokens each chunk reaches into each neighbour (a sentence-long fact)

    def problems(self):
        out = at_least(self, 1, "chunk_size")
        if self.chunk_overlap < 0:
            out.append(f"chunk_overlap={self.chunk_overlap} must be >= 0")
        return out

    def __call__(self, prompt: LongContextPrompt, bos_id: int | None) -> list[Span]:
        n, c, o = len(check_context(prompt.context)), self.chunk_size, self.chunk_overlap
        return [Span(max(0, s - o), min(s + c + o, n), bos_id is not None) for s in range(0, n, c)]


@CHUNKERS.register
@dataclass(frozen=True)
class SnappedChunks(Stage):
    """``snapped``: structure-aware boundaries. Each fixed cut k * chunk_size moves to the strongest
    break (paragraph, line, sentence, clause, word: pdllm.boundaries) within ``snap_window`` tokens
    of it, so a sentence is rarely cut in two; a last piece shorter than the window joins the chunk
    before it. No chunk is empty, none is longer than chunk_size + 2 * snap_window, and the scoring
    cost is the fixed chunks'. The breaks come from the prompt (``LongContextPrompt.breaks``, which
    Tokenizer.long_context_prompt rates from the text); a prompt built from ids alone has none and
    is cut at the fixed offsets, as ``bos_added`` cuts it (pdllm.boundaries.token_breaks rates ids
    with their tokenizer)."""

    name = "snapped"
    chunk_size: int = 1024
    snap_window: int | None = None  # tokens a cut may move either way; None: a quarter of chunk_size

    def problems(self):
        out = at_least(self, 1, "chunk_size")
        if self.snap_window is not None and not 0 <= 2 * self.snap_window < self.chunk_size:
            out.append(f"snap_window={self.snap_window} must be >= 0 and below half of chunk_size={self.chunk_size} "
                       "(neighbouring cuts' windows may not overlap)")
        return out

    def window(self) -> int:
        return (self.chunk_size - 1) // 4 if self.snap_window is None else self.snap_window

    def __call__(self, prompt: LongContextPrompt, bos_id: int | None) -> list[Span]:
        n, w = len(check_context(prompt.context)), self.window()
        breaks = prompt.breaks
        if breaks is None:
            breaks, w = [0] * n, 0
        cuts = snapped_spans(n, self.chunk_size, breaks, w)
        if len(cuts) > 1 and cuts[-1][1] - cuts[-1][0] < w:  # a sliver at the end: the cut before it would
            cuts[-2:] = [(cuts[-2][0], n)]  # have to fall inside whatever it holds
        return [Span(a, b, bos_id is not None) for a, b in cuts]
