"""PrefillConfig: every knob of Prefilling-dLLM, one flat namespace.

Two kinds of knobs: the pipeline's own (``PipelineKnobs`` below: which stage runs each step,
the BOS anchors, token sparsity, positions, the decode), and each registered stage's, which are
the fields of its class (``chunk_size`` of the chunkers, ``top_k`` of the top-K selector,
``score_layers`` of the attention scorer ...). A stage registered from outside pdllm brings its
knobs with it: ``PrefillConfig(score="mine", my_knob=3)`` and ``--my-knob 3`` work without an
edit here. Every knob is checked on its own whatever stage runs, and the stages that run check
their knobs together with the rest (``Stage.check``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from pdllm.prefill.layout import POSITION_GRIDS, POSITION_MODES
from pdllm.prefill.stages import STEPS, Stage, at_least, choices


@dataclass(frozen=True)
class PipelineKnobs(Stage):
    """The knobs of the pipeline itself."""

    name = "pipeline"
    chunking: str = "overlap"  # the chunker (stages.CHUNKERS): overlap | snapped | bos_added | bos_in_chunk (official)
    score: str = "attention"  # the scorer (stages.SCORERS): attention | draft | ...
    selection: str = "top_k"  # the selector (stages.SELECTORS)
    cache_mode: str = "full_prompt_mask"  # the cache builder (stages.CACHE_BUILDERS): full_prompt_mask | chunk_query
    chunk_size: int = 1024  # context tokens per chunk (the chunkers read it; position_grid="chunk_size" too)
    chunk_bos: bool = True  # BOS anchor in front of every chunk
    keep_margin: int = 0  # context tokens kept on each side of every selected chunk (merged where they meet)
    token_capacity: int | None = None  # rows kept per selected chunk (BOS included); None = all
    token_query_window: int = 8  # token sparsity scores with the last N query rows, all layers
    pool_kernel: int = 7  # max-pool width along tokens (SnapKV), for token sparsity as for scoring
    score_batch: int = 8  # chunks per scoring forward, for token sparsity as for scoring
    positions: str = field(default="continuous", metadata=choices(*POSITION_MODES))
    position_grid: str = field(default="lengths", metadata=choices(*POSITION_GRIDS))
    slot0_logit: str = field(default="rerun", metadata=choices("rerun", "block_start"))
    # Dream's cached steps: "rerun" the row before the block with it, or keep that row's K/V and
    # logit from the "block_start" re-encode (the official dual cache)
    chunk_parallel: bool = False  # score the chunks across torch.distributed's ranks (torchrun); see prefill.parallel

    def problems(self):
        out = at_least(self, 1, "chunk_size", "token_query_window", "pool_kernel", "score_batch")
        if self.keep_margin < 0:
            out.append(f"keep_margin={self.keep_margin} must be >= 0")
        if self.keep_margin and self.positions == "absolute":
            out.append("keep_margin needs positions='continuous' or 'reuse' (a widened chunk has no place of its "
                       "own in the anchored context)")
        if self.token_capacity is not None and self.token_capacity < 1 + self.chunk_bos:
            out.append(f"token_capacity={self.token_capacity} must keep at least one token besides the BOS")
        return out


def knob_classes() -> list[type]:
    """The dataclasses whose fields are knobs: the pipeline's, then every registered stage's."""
    return [PipelineKnobs] + [cls for registry in STEPS.values() for cls in registry.values()]


def knob_fields() -> dict[str, tuple[dataclasses.Field, object]]:
    """Every knob by name: (its field, its type hint). A name two classes share must agree."""
    out: dict[str, tuple[dataclasses.Field, object]] = {}
    for cls in knob_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in out:
                first, hint = out[f.name]
                if (first.default, hint) != (f.default, hints[f.name]):
                    raise TypeError(f"knob {f.name!r} of {cls.__qualname__} ({hints[f.name]} = {f.default!r}) differs from "
                                    f"the one already declared ({hint} = {first.default!r}); a shared knob is one knob")
                continue
            out[f.name] = (f, hints[f.name])
    return out


def knob_choices() -> dict[str, tuple]:
    """The values a knob may take, where they are a list: each step's registered stages, and the
    ``choices`` a field's metadata names."""
    out = {step: tuple(registry) for step, registry in STEPS.items()}
    for name, (f, _) in knob_fields().items():
        if "choices" in f.metadata:
            out[name] = f.metadata["choices"]
    return out


def _values_for(cls, values: dict) -> dict:
    return {f.name: values[f.name] for f in dataclasses.fields(cls)}


class PrefillConfig:
    """Prefill's knobs (see the module docstring); ``cfg.top_k`` reads one, ``cfg.stage("score")``
    builds the stage that runs a step, from its knobs."""

    def __init__(self, **knobs):
        fields = knob_fields()
        unknown = sorted(set(knobs) - set(fields))
        if unknown:
            raise ValueError(f"invalid prefill config: unknown knob(s) {unknown}; the knobs are {sorted(fields)}")
        values = {name: knobs.get(name, f.default) for name, (f, _) in fields.items()}
        object.__setattr__(self, "_values", values)
        problems: list[str] = []
        for name, allowed in knob_choices().items():
            if values[name] not in allowed:
                problems.append(f"{name}={values[name]!r} must be one of {allowed}")
        for cls in knob_classes():  # each knob on its own, whichever stage runs
            problems += [p for p in cls(**_values_for(cls, values)).problems() if p not in problems]
        if not problems:  # the stages that run, with the rest of the knobs
            for step in STEPS:
                problems += self.stage(step).check(self)
        if problems:
            raise ValueError("invalid prefill config: " + "; ".join(problems))

    def __getattr__(self, name):
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"PrefillConfig has no knob {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("a PrefillConfig is fixed once made; use cfg.replace(knob=value)")

    def __eq__(self, other):
        return isinstance(other, PrefillConfig) and self._values == other._values

    def __repr__(self):
        defaults = {name: f.default for name, (f, _) in knob_fields().items()}
        given = ", ".join(f"{k}={v!r}" for k, v in self._values.items() if defaults.get(k) != v)
        return f"PrefillConfig({given})"

    def as_dict(self) -> dict:
        return dict(self._values)

    def replace(self, **knobs) -> "PrefillConfig":
        return PrefillConfig(**{**self._values, **knobs})

    def stage(self, step: str):
        """The stage that runs ``step`` ("chunking", "score", "selection", "cache_mode"), with its knobs."""
        cls = STEPS[step].lookup(self._values[step])
        return cls(**_values_for(cls, self._values))

    @staticmethod
    def knob_fields() -> list[tuple[dataclasses.Field, object]]:
        """(field, type hint) of every knob: what the command line derives its flags from."""
        return list(knob_fields().values())

    @staticmethod
    def knob_choices() -> dict[str, tuple]:
        return knob_choices()

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
