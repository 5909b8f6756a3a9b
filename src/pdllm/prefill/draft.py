"""Step 2, the draft scorer (the official code's): a short draft answer is decoded from prefix +
query alone; a chunk's score is how likely the chunk makes the draft, the mean log-probability of
the draft tokens given prefix + [BOS + chunk] + query.

The likelihood follows the model: ``masked`` for a bidirectional model like LLaDA (the draft slots
masked together, one forward per chunk batch), ``causal`` for an AR-initialised model like Dream
(next-token log-probabilities of query + draft under a causal mask), ``leave_one_out`` as the
official code scores LLaDA (each query and draft token masked alone, full attention). The
official draft procedure and partial-draft score are knobs too (``draft_decoder="confidence"``,
``draft_scored="confirmed"``; ``PrefillConfig.official``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdllm.official import confidence_drafts
from pdllm.prefill.scorers import batches
from pdllm.prefill.stages import SCORERS, Chunked, Stage, at_least, choices, scored
from pdllm.sampler import GenerationConfig, Vanilla, generate
from pdllm.tokenizer import LongContextPrompt

DRAFT_DECODERS = ("sampler", "confidence")  # pdllm's sampler | the official confidence rule (pdllm.official)
DRAFT_LIKELIHOODS = ("masked", "causal", "leave_one_out", None)


@SCORERS.register
@dataclass(frozen=True)
class DraftScorer(Stage):
    """``draft``: chunk score = mean log-probability of a draft answer decoded without the context."""

    name = "draft"
    draft_tokens: int = 4  # length of the draft answer
    draft_likelihood: str | None = field(default=None, metadata=choices(*DRAFT_LIKELIHOODS))
    # None: causal for shifted-logit models (Dream), else masked
    draft_decoder: str = field(default="sampler", metadata=choices(*DRAFT_DECODERS))
    draft_rounds: int | None = None  # confidence draft: R rounds of one slot each; None: until full (threshold)
    draft_threshold: float = 0.9  # confidence draft until full: every slot at or above it is unmasked
    draft_draws_mask: bool = True  # confidence draft: [MASK] may win the argmax (the official code allows it)
    draft_scored: str = field(default="all", metadata=choices("all", "confirmed"))
    # "all" draft slots are scored, or only the "confirmed" ones (the rest stay [MASK])
    score_batch: int = 8  # rows per scoring forward

    def problems(self):
        out = at_least(self, 1, "draft_tokens", "score_batch")
        if self.draft_rounds is not None and self.draft_rounds < 0:
            out.append(f"draft_rounds={self.draft_rounds} must be >= 0 (or None: decode the draft until full)")
        if not 0.0 < self.draft_threshold <= 1.0:
            out.append(f"draft_threshold={self.draft_threshold} must be in (0, 1]")
        return out

    def provides_kv(self, model) -> bool:
        return False  # each chunk is encoded with the draft, not with the query the decode reads

    def likelihood(self, model) -> str:
        return self.draft_likelihood or ("causal" if model.cfg.logit_shift else "masked")

    def __call__(self, model, requests: list[Chunked], block_length: int, sink=None) -> list[torch.Tensor]:
        drafts = draft_answers(model, [r.prompt for r in requests], self)
        return score_requests_draft(model, requests, drafts, self)


def draft_answers(model, prompts: list[LongContextPrompt], cfg: DraftScorer) -> list[tuple[list[int], list[bool]]]:
    """Per request, a short draft answer from prefix + query alone (no context), decoded greedily,
    and which of its slots the scores read (``draft_scored``); all requests decode as one batch.

    ``sampler``: pdllm's vanilla sampler over prefix + query + [MASK] * n, one slot per step.
    ``confidence``: the official procedure (``pdllm.official.confidence_drafts``): the prompt
    encoded alone, the slots against its KV, slot 0 from its logit, then ``draft_rounds`` rounds of
    the single most confident slot, or until full by ``draft_threshold``; unconfirmed slots stay
    [MASK] in the draft.
    """
    n, ids = cfg.draft_tokens, [p.prefix + p.query for p in prompts]
    if cfg.draft_decoder == "sampler":  # left-padded, padding masked out of every key read
        gc = GenerationConfig(gen_length=n, block_length=n, steps=n)
        drafts = [(d, [True] * n) for d in generate(model, ids, gc, method=Vanilla()).tokens.tolist()]
    else:
        drafts = confidence_drafts(model, ids, n, cfg.draft_rounds, cfg.draft_threshold, cfg.draft_draws_mask)
    return [(d, confirmed if cfg.draft_scored == "confirmed" else [True] * n) for d, confirmed in drafts]


@dataclass
class DraftJob:
    """One chunk's draft-likelihood row: prefix + chunk + query + draft (shown as the mode wants),
    the logit rows (or, leave one out, the token positions) first.. that predict ``targets``, and
    which targets are ``read`` (the query and the scored draft slots)."""

    request: int
    chunk: int
    tokens: list[int]
    first: int
    targets: list[int]
    read: list[bool]


def score_requests_draft(model, requests: list[Chunked], drafts, cfg: DraftScorer) -> list[torch.Tensor]:
    """Chunk score = mean log-probability of the draft (higher = the chunk supports the answer).

    ``masked`` (bidirectional models, LLaDA): the draft slots are [MASK]; score the true draft
    token at each slot — the masked-diffusion likelihood. ``causal`` (AR-initialised, Dream): a
    causal mask, and the log-probability of every query and draft token given what precedes it.
    ``leave_one_out`` (the official code's LLaDA score): every query and draft token scored with
    itself alone masked, full attention, one row per token. ``drafts[b]`` is request b's (draft,
    scored): ``scored`` says which draft slots count; the others stay in the row as they are
    (official: [MASK]) and are not read.

    The rows of every request go through shared forwards, grouped by shape (the same length and
    the same logit rows read). Returns (n_chunks,) fp32 per request.
    """
    mode = cfg.likelihood(model)
    dev, mask_id = model.device, model.cfg.mask_id
    jobs = []
    for b, (r, (draft, slots_read)) in enumerate(zip(requests, drafts)):
        prompt = r.prompt
        P, Q, d = len(prompt.prefix), len(prompt.query), len(draft)
        read = list(slots_read) if mode == "masked" else [True] * Q + list(slots_read)
        if not any(read):
            raise ValueError("no draft token is scored: keep at least one slot")
        shown = [mask_id] * d if mode == "masked" else list(draft)
        targets = list(draft) if mode == "masked" else prompt.query + list(draft)
        for i, c in enumerate(r.chunks):
            tokens = prompt.prefix + c + prompt.query + shown
            first = {"masked": len(tokens) - d,  # the slots' own logits
                     "causal": P + len(c) - 1,  # row t - 1 predicts token t
                     "leave_one_out": P + len(c)}[mode]  # the positions masked one at a time
            jobs.append(DraftJob(b, i, tokens, first, targets, read))
    scores = [torch.empty(len(r.chunks)) for r in requests]
    if mode == "leave_one_out":  # one row per (job, token read), batched across jobs of one length
        pairs = [(j, job.first + t) for j, job in enumerate(jobs) for t, r in enumerate(job.read) if r]
        logp = leave_one_out_logp(model, [job.tokens for job in jobs], pairs, cfg.score_batch)
        per_job: list[list[torch.Tensor]] = [[] for _ in jobs]
        for (j, _), lp in zip(pairs, logp):
            per_job[j].append(lp)
        for job, lps in zip(jobs, per_job):
            scores[job.request][job.chunk] = torch.stack(lps).mean()
        scored(len(jobs), len(jobs))
        return scores
    for ids in batches([(len(job.tokens), job.first) for job in jobs], cfg.score_batch):
        group = [jobs[j] for j in ids]
        T, first, n = len(group[0].tokens), group[0].first, len(group[0].targets)
        idx = torch.tensor([job.tokens for job in group], device=dev)
        pos = torch.arange(T, device=dev).expand_as(idx)
        mask = None if mode == "masked" else torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        logits = model(idx, pos, mask=mask, logits_slice=slice(first, first + n)).float()  # (B, n, V)
        target = torch.tensor([job.targets for job in group], device=dev)
        logp = logits.log_softmax(dim=-1).gather(-1, target[..., None]).squeeze(-1).cpu()  # (B, n)
        for row, job in enumerate(group):  # each row its own request's slots read
            scores[job.request][job.chunk] = logp[row, torch.tensor(job.read)].mean()
        scored(len(group), len(jobs))
    return scores


def leave_one_out_logp(model, rows: list[list[int]], pairs: list[tuple[int, int]], batch: int) -> torch.Tensor:
    """log p(rows[j][a] | rows[j] with position a alone masked) for each (j, a) of ``pairs``:
    (len(pairs),). The pairs run ``batch`` per forward, full attention, positions 0..T-1, grouped
    by row length, whichever row they come from."""
    dev, logp = model.device, torch.empty(len(pairs))
    for g in batches([len(rows[j]) for j, _ in pairs], batch):
        T, n = len(rows[pairs[g[0]][0]]), len(g)
        x = torch.tensor([rows[pairs[p][0]] for p in g], device=dev)
        cols = torch.tensor([pairs[p][1] for p in g], device=dev)
        target = x[torch.arange(n), cols]
        x[torch.arange(n), cols] = model.cfg.mask_id
        hidden = model(x, torch.arange(T, device=dev).expand(n, T), return_hidden=True)  # (n, T, C)
        logits = model.lm_head(hidden[torch.arange(n), cols]).float()  # (n, V)
        logp[g] = logits.log_softmax(dim=-1).gather(-1, target[:, None]).squeeze(1).cpu()
    return logp
