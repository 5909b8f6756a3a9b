"""What the official Prefilling-dLLM code does where pdllm's defaults differ: its draft procedure
(as its own function), the prompt and decoding settings of its best LongBench run.

The official code (github menik1126/Prefilling-dLLM, ``fastdllm_parallelcomp.py``) decodes the
draft its chunk scores are conditioned on, and every answer block, with one confidence rule:

    n [MASK] slots run against the cached prompt        -> a logit for every slot
    slot 0 := the argmax of its logit                   (Dream: the last prompt logit; its logits
                                                          are shifted, the row before a slot predicts it)
    then, each forward re-running the slots against that cache:
        rounds = R:     R rounds, each fills the single most confident masked slot
        rounds = None:  until no slot is masked, the most confident slot plus every slot whose
                        confidence >= threshold
    confidence = the softmax probability of the argmax, over the whole vocabulary: [MASK] is not
    excluded, and a slot that draws [MASK] stays masked (pdllm's sampler excludes it).

``confidence_drafts`` is the draft (a batch of prompts at once), ``generate_official`` the answer
path (over any sampler method), both on ``unmask_by_confidence``. ``PrefillConfig.official(arch)``
(prefill.py) is the preset that follows the official selection step by step; README "Reproducing
the official code" lists each step against pdllm's default.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from pdllm.cache import DenseKVCache
from pdllm.sampler import (GenerationConfig, GenerationOutput, begin_method, left_pad, make_batch, select_transfer,
                           synchronize)
from pdllm.tokenizer import LongContextPrompt

# The official README's best LongBench run decodes 32 tokens in one block of 32, threshold 0.9,
# greedy (its `steps` is unused under a threshold).
OFFICIAL_GENERATION = dict(gen_length=32, block_length=32, steps=32, threshold=0.9, temperature=0.0)


def unmask_by_confidence(slot_logits: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, mask_id: int,
                         rounds: int | None = None, threshold: float = 0.9, draw_mask: bool = True) -> torch.Tensor:
    """Fill ``tokens`` (B, L), all [MASK] on entry, in place, by the official confidence rule.

    slot_logits(tokens) -> (B, L, V): the logits predicting each slot given the current tokens
    (its first call, on the all-[MASK] block, gives slot 0). Returns the confirmed slots (B, L)
    bool: with ``rounds``, slot 0 and the slot each round chose (the others stay [MASK]); until
    full, every slot (the official code then scores them all, even one left [MASK]).
    """
    B, L = tokens.shape
    confirmed = torch.zeros_like(tokens, dtype=torch.bool)

    def draw(logits):  # greedy: confidence and argmax over the vocabulary
        logits = logits.float()
        if not draw_mask:
            logits[..., mask_id] = float("-inf")
        return logits.softmax(dim=-1).max(dim=-1)

    _, first = draw(slot_logits(tokens)[:, :1])
    tokens[:, 0] = first[:, 0]  # slot 0 is filled unconditionally, whatever its confidence
    confirmed[:, 0] = True
    forwards = 0
    while (tokens == mask_id).any():
        if forwards == (rounds if rounds is not None else L + 8):  # the official guard: L + 8 forwards
            break
        masked = tokens == mask_id
        conf, x0 = draw(slot_logits(tokens))
        conf = torch.where(masked, conf, float("-inf"))
        if rounds is not None:  # one slot per round: the most confident
            pick = select_transfer(conf, torch.ones(B, dtype=torch.long, device=tokens.device), None)
        else:  # the most confident, and every slot at or above the threshold
            pick = select_transfer(conf, None, threshold)
        tokens[pick] = x0[pick]
        confirmed |= pick
        forwards += 1
    if rounds is None:
        confirmed[:] = True
    return confirmed


@torch.no_grad()
def confidence_drafts(model, prompts_ids: list[list[int]], n_tokens: int, rounds: int | None = None,
                      threshold: float = 0.9, draw_mask: bool = True) -> list[tuple[list[int], list[bool]]]:
    """The official draft of every prompt, as one batch: each ``prompts_ids[b]`` (prefix + query)
    encoded alone (full attention, positions 0..T_b-1; left padding is masked out of every key
    read), ``n_tokens`` [MASK] slots at positions T_b.. run against that KV (the prompt never sees
    them), then ``unmask_by_confidence``. Each row draws from its own logits only, and a row whose
    slots are all filled takes no further pick, so every draft is the one its prompt gets alone.
    Returns per prompt (draft tokens, confirmed slots)."""
    dev = model.device
    ids, valid, pos = left_pad(prompts_ids, model.cfg.mask_id)  # (B, T): the pad token is never read
    B, T = ids.shape
    key_mask = torch.cat([valid, torch.ones(B, n_tokens, dtype=torch.bool)], dim=1).to(dev)
    cache = DenseKVCache.for_model(model, B, T + n_tokens, None if valid.all() else key_mask)
    last = model(ids.to(dev), pos.to(dev), cache=cache.window(0, T), logits_slice=slice(T - 1, T))
    slot_pos = (pos[:, -1:] + 1 + torch.arange(n_tokens)).to(dev)  # (B, n): T_b, T_b + 1, ...

    def slot_logits(tokens):
        logits = model(tokens, slot_pos, cache=cache.window(T))  # (B, n, V)
        if model.cfg.logit_shift:  # Dream: slot 0 from the last prompt row, slot i from slot i - 1
            logits = torch.cat([last, logits[:, :-1]], dim=1)
        return logits

    tokens = torch.full((B, n_tokens), model.cfg.mask_id, dtype=torch.long, device=dev)
    confirmed = unmask_by_confidence(slot_logits, tokens, model.cfg.mask_id, rounds, threshold, draw_mask)
    return list(zip(tokens.tolist(), confirmed.tolist()))


def confidence_draft(model, prompt_ids: list[int], n_tokens: int, rounds: int | None = None, threshold: float = 0.9,
                     draw_mask: bool = True) -> tuple[list[int], list[bool]]:
    """The official draft of one prompt (see ``confidence_drafts``): (draft tokens, confirmed slots)."""
    return confidence_drafts(model, [prompt_ids], n_tokens, rounds, threshold, draw_mask)[0]


def plain_long_context_prompt(tok, context: str, question: str, instruction: str, question_template: str
                              ) -> LongContextPrompt:
    """The official LongBench prompt: [BOS] + the instruction, the context, the question, each
    tokenized alone, no chat template (its eval's default ``--no-use_chat_template``)."""
    return LongContextPrompt(prefix=[tok.bos_id] + tok.encode(instruction), context=tok.encode(context),
                             query=tok.encode(question_template.format(question=question)))


@torch.no_grad()
def generate_official(model, prompts, config: GenerationConfig, method) -> GenerationOutput:
    """The official generate's answer path, over a sampler method (the preset's: ``Prefill``).

    Per block: the first forward (the method's step 0: for ``Prefill`` with ``full_prompt_mask``
    the one encode of prefix + selected chunks + query + [MASK]s) fills slot 0 from its logit,
    then every further forward (the method's cached steps) unmasks by ``config.threshold`` —
    ``unmask_by_confidence``, the draft's rule, [MASK] drawable. Where ``generate`` thresholds from
    the first forward and never draws [MASK]. Greedy only, as the official threshold decoder.
    (The official dual cache for Dream, the row before the block kept from the block start, is
    ``PrefillConfig.slot0_logit="block_start"``, which the preset sets.)
    """
    if config.threshold is None or config.temperature != 0 or config.cfg_scale != 0:
        raise ValueError("generate_official runs the official threshold decoder: set threshold (0.9), "
                         "temperature=0 and cfg_scale=0")
    batch = make_batch(model, prompts, config, model.cfg.eos_id)
    x, P, dev = batch.x, batch.prompt_len, model.device
    t0, t1 = begin_method(model, method, batch)  # caches, chunk selection: before the first step
    nfe = 0
    for blk in range(config.num_blocks):
        s, e = P + blk * config.block_length, P + (blk + 1) * config.block_length
        steps = 0

        def slot_logits(tokens):  # tokens is x[:, s:e] itself: the method reads the current x
            nonlocal steps, nfe
            logits = method.block_logits(model, x, s, e, steps)
            steps, nfe = steps + 1, nfe + 1
            return logits

        unmask_by_confidence(slot_logits, x[:, s:e], batch.mask_id, None, config.threshold, draw_mask=True)
    synchronize(dev)
    t2 = time.perf_counter()
    stats = {"method": method.name, "begin_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0, "nfe": nfe,
             "batch": x.shape[0], "gen_length": config.gen_length, **method.stats}
    return GenerationOutput(tokens=x[:, P:].clone(), nfe=nfe, stats=stats)
