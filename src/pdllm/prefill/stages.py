"""The selection pipeline's seams: what flows between the stages, and where each kind registers.

    context ──chunker──► spans ──scorer──► a score per span ──selector──► kept spans ──cache builder──► pool

* A **chunker** cuts a request's context into ``Span``s (context tokens [start, end), with or
  without a BOS anchor row in front). Spans are the data every later step reads: the chunk rows
  scored, the pool sized, the positions laid out, the recall@K of an evaluation, the shares of
  chunk-parallel scoring. Nothing recomputes a boundary.
* A **scorer** gives every span of every request a score (higher: more likely to hold what the
  question needs), all requests of a batch together.
* A **selector** keeps a set of spans of any size from the scores (top-K is one rule).
* A **cache builder** encodes what was kept into the pool the decode reads, and re-encodes it at
  each block start.

A stage is a small frozen dataclass: its fields are the knobs it reads (they become
``PrefillConfig`` knobs, ``generate(..., knob=value)`` keywords and ``--knob`` flags), its
``problems()`` checks each of them on its own, and ``@REGISTRY.register`` makes it a choice of its
step (``PrefillConfig.chunking`` / ``score`` / ``selection`` / ``cache_mode``). A knob two stages
share (``chunk_size``, ``score_batch``) is one knob: the same name must mean the same type and
default everywhere.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from pdllm.registry import Registry
from pdllm.tokenizer import LongContextPrompt

CHUNKERS = Registry("chunker")
SCORERS = Registry("scorer")
SELECTORS = Registry("selector")
CACHE_BUILDERS = Registry("cache builder")
# The PrefillConfig knob that names each step's stage -> the registry it is looked up in.
STEPS = {"chunking": CHUNKERS, "score": SCORERS, "selection": SELECTORS, "cache_mode": CACHE_BUILDERS}


def choices(*values) -> dict:
    """Field metadata: the values a string knob may take (checked by PrefillConfig, shown by --help)."""
    return {"choices": tuple(values)}


class Stage:
    """Base of every stage: the knob checks. Subclasses are frozen dataclasses whose fields are knobs."""

    name: ClassVar[str]

    def problems(self) -> list[str]:
        """What is wrong with each knob on its own (checked for every registered stage, whichever runs)."""
        return []

    def check(self, cfg) -> list[str]:
        """What is wrong with the knobs together with the rest of the run's (only for the stages that run)."""
        return []


def at_least(stage, minimum: int, *names: str) -> list[str]:
    """One problem per integer knob below its minimum."""
    return [f"{n}={getattr(stage, n)} must be >= {minimum}" for n in names if getattr(stage, n) < minimum]


@dataclass(frozen=True)
class Span:
    """One chunk of a request's context: context tokens [start, end), led by a BOS anchor row or not."""

    start: int
    end: int
    bos: bool = False

    @property
    def rows(self) -> int:
        """The rows the chunk takes in a forward (its tokens, and the anchor)."""
        return self.end - self.start + self.bos

    def holds(self, start: int, end: int) -> bool:
        """Whether context tokens [start, end) all lie in this span."""
        return self.start <= start and end <= self.end


@dataclass
class Chunked:
    """One request after chunking: its prompt, its spans, each span's rows (``[BOS] + tokens``), and
    which of the request's chunks these are (a share of them under chunk-parallel scoring)."""

    prompt: LongContextPrompt
    spans: list[Span]
    chunks: list[list[int]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, prompt: LongContextPrompt, spans: list[Span], bos_id: int | None) -> "Chunked":
        if any(s.bos for s in spans) and bos_id is None:
            raise ValueError("a span asks for a BOS anchor but no bos_id was given")
        chunks = [[bos_id] * s.bos + prompt.context[s.start : s.end] for s in spans]
        return cls(prompt, spans, chunks, list(range(len(spans))))

    def share(self, ids: list[int]) -> "Chunked":
        """The same request with only chunks ``ids`` (indices into this one's)."""
        return Chunked(self.prompt, [self.spans[i] for i in ids], [self.chunks[i] for i in ids],
                       [self.ids[i] for i in ids])


# A progress report over the chunks scored: scorers call ``scored(n)`` as n more chunks are scored,
# and whoever shows progress (the command line's bar) listens with ``chunk_progress``. A long context
# on a CPU takes minutes to score, and a bar over the decoding steps alone sits at 0% through them.
_listener: ContextVar[Callable[[int, int], None] | None] = ContextVar("chunk_progress", default=None)


@contextmanager
def chunk_progress(callback: Callable[[int, int], None]):
    """Within the block, ``callback(n, total)`` as scorers report n more of a batch's total chunks."""
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


def scored(n: int, total: int):
    """A scorer scored n more of its total chunks (of every request of the batch)."""
    listener = _listener.get()
    if listener is not None:
        listener(n, total)
