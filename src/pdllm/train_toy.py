"""Train pdllm's toy LLaDA-format model on synthetic long-context retrieval.

No real LLaDA weights are available here, so pdllm ships its own small masked-diffusion model,
in the LLaDA checkpoint format, to measure what sparse prefill does to *answers*. The embedded
model is built by its recipe (``src/pdllm/assets/toy/recipe.py``: the stages, each one run of this
trainer initialised from the one before), on one GPU:

    python -m pdllm.train_toy --recipe src/pdllm/assets/toy/recipe.py --out runs/toy --device cuda
    python -m pdllm.train_toy --out runs/x --device cuda --max-context 2048 ...   (one run, flags)
    python -m pdllm.train_toy --out /tmp/toy --smoke                             (a few CPU steps, for tests)

Data, generated on the fly in DataLoader workers from (seed, step), in three kinds of rows:

* **SFT rows**: the chat prompt of :mod:`pdllm.tokenizer` (prefix + context + question) of one of
  the tasks of :mod:`pdllm.data.synthetic` (passkey, multi-key needle, kv lookup; mixed by
  ``task_weights``) at a random depth, then an answer region of ``answer_length`` tokens (the
  answer's digits, then EOS padding). Prompt tokens are never masked.
* **passage rows** (``passage_frac`` of the SFT rows): the same, with the context cut into
  passages of random length, each led by BOS, as a retrieval-augmented prompt hands a model
  its documents.
* **pretraining rows** (``pretrain_frac`` of the rows): documents (prose, lists, written-out
  records of the tasks) packed into one sequence, each led by BOS, every token maskable: how
  LLaDA-style models are pretrained, and why a BOS inside a sequence is something they know.

Objective, as LLaDA's: per sequence t ~ U(0, 1), each maskable token is masked with probability
p = (1 - eps) t + eps; the loss is the cross-entropy on masked tokens weighted by 1/p, summed per
sequence, divided by the number of maskable tokens, averaged over the batch. ``full_mask_frac``
of the SFT rows have the whole answer masked (t = 1): see make_train_batch.

Curriculum: the context length of a batch is drawn from [min_context, L(step)], where L grows
linearly from min_context to max_context over the first ``curriculum_frac`` of training
(``long_frac`` of the batches use L(step) itself); the number of sequences per batch keeps the
tokens per batch constant.

At the end: a bf16 checkpoint (config.json with LLaDA names, model.safetensors with LLaDA keys,
tokenizer.json), reloaded with ``from_pretrained`` and evaluated by greedy masked-diffusion
decoding (dense ``vanilla``, :func:`pdllm.eval.harness.run_examples`) on held-out examples of every
task over a grid of depths; results go to eval.json, and the model card README.md is written from
them. Data and initialisation are reproducible from ``--seed``; CUDA kernels may add run-to-run
noise of the last bits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pdllm.checkpoint import from_pretrained, save_pretrained
from pdllm.data.synthetic import TASKS, make_example, make_grid, packed_sequence, piece_encoder, split_passages
from pdllm.data.toy_tokenizer import build_toy_tokenizer
from pdllm.data.toy_tokenizer import save as save_tokenizer
from pdllm.environment import environment
from pdllm.model import ModelConfig, Transformer
from pdllm.sampler import left_pad
from pdllm.tokenizer import Tokenizer

MASK_EPS = 1e-3  # LLaDA's eps: p_mask = (1 - eps) t + eps


@dataclass
class TrainConfig:
    # model
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 4
    mlp_hidden: int = 768
    rope_theta: float = 10000.0
    embedding_std: float = 1.0  # N(0, std) token embeddings (the rest: N(0, 0.02)); see init_for_training
    # data
    tasks: str = ",".join(TASKS)  # comma-separated subset of pdllm.data.synthetic.TASKS
    task_weights: str = ""  # e.g. "passkey=1,multikey_needle=2": sampling weights (default 1 each)
    chunk_size: int = 128  # the chunk size Prefilling-dLLM runs with on this model (the card says it)
    min_context: int = 64
    max_context: int = 2048
    curriculum_frac: float = 0.5  # the longest length is reached after this share of the steps
    long_frac: float = 0.5  # share of batches at the current longest length (the rest: uniform below it)
    answer_length: int = 16  # answer digits + EOS padding (= the gen_length of the evals)
    needle_spacing: int = 48  # multi-key: at most one needle per this many context tokens (a needle is ~18)
    min_needles: int = 1  # multi-key: at least this many (2+: the one-needle shortcut, copy the only number, fails)
    tokens_per_batch: int = 65536
    pretrain_frac: float = 0.0  # share of rows that are packed BOS-led documents, every token maskable
    passage_frac: float = 0.0  # share of SFT rows whose context is cut into BOS-led passages
    passage_min: int = 32  # passage lengths, uniform in [passage_min, passage_max] tokens
    passage_max: int = 256
    full_mask_frac: float = 0.0  # share of SFT rows whose whole answer is masked (t = 1); see make_train_batch
    # optimisation
    steps: int = 4000  # the learning-rate schedule's length
    stop_at: int = 0  # end the run after this many steps (0: at `steps`); the schedule stays that of `steps`
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # evaluation
    eval_n: int = 100  # held-out examples per task at each eval length
    eval_lengths: tuple[int, ...] = ()  # default: (max_context,)
    eval_batch: int = 50
    eval_steps: int = 0  # denoising steps for the answer region; 0: one token per step
    # runtime
    workers: int = -1  # DataLoader workers; -1: min(8, cpus - 1)
    max_train_minutes: float = 6.5  # safety stop: end training early (and say so) past this
    log_every: int = 50

    @property
    def task_list(self) -> tuple[str, ...]:
        tasks = tuple(t.strip() for t in self.tasks.split(",") if t.strip())
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown tasks {unknown}; choose from {TASKS}")
        return tasks

    @property
    def task_weight_list(self) -> tuple[float, ...]:
        """One sampling weight per task of ``task_list``, from ``task_weights`` ("task=w,...")."""
        weights = dict.fromkeys(self.task_list, 1.0)
        for item in filter(None, (x.strip() for x in self.task_weights.split(","))):
            name, sep, w = item.partition("=")
            if not sep or name.strip() not in weights:
                raise ValueError(f"bad task weight {item!r}: write task=weight with a task of {self.task_list}")
            try:
                weights[name.strip()] = float(w)
            except ValueError:
                raise ValueError(f"bad task weight {item!r}: {w!r} is not a number") from None
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError(f"task weights must be >= 0 and not all 0, got {weights}")
        return tuple(weights.values())

    @property
    def steps_to_run(self) -> int:
        return min(self.steps, self.stop_at) if self.stop_at > 0 else self.steps


SMOKE = dict(d_model=64, n_layers=2, n_heads=2, mlp_hidden=128, min_context=32, max_context=96, chunk_size=32,
             answer_length=8, tokens_per_batch=1024, steps=6, warmup=2, eval_n=5, eval_batch=5, eval_steps=2,
             workers=0, log_every=2)


# ---------------------------------------------------------------------------------------------
# Data: one batch per step, made from (seed, step) alone
# ---------------------------------------------------------------------------------------------


def context_length_for_step(cfg: TrainConfig, step: int, rng: random.Random) -> int:
    """The curriculum: draw the batch's context length given the step."""
    frac = min(1.0, step / max(1, cfg.curriculum_frac * cfg.steps))
    hi = int(cfg.min_context + frac * (cfg.max_context - cfg.min_context))
    return hi if rng.random() < cfg.long_frac else rng.randint(cfg.min_context, max(cfg.min_context, hi))


def task_kwargs(task: str, rng: random.Random, context: int, needle_spacing: int = 48, min_needles: int = 1) -> dict:
    """Vary the task parameters a little, so the model learns the tasks, not one instance.
    Short contexts get fewer multi-key needles (one per ``needle_spacing`` tokens; each is ~18), so
    by default they stay mostly haystack."""
    if task == "passkey":
        return {"passkey_digits": rng.choice((4, 5, 5, 6))}
    if task == "multikey_needle":
        most = max(min_needles, min(9, context // needle_spacing))
        n = rng.randint(min(min_needles, 6), max(min_needles, min(6, most)))
        return {"num_needles": n, "num_distractors": rng.randint(0, min(3, most - n))}
    return {"key_style": "uuid" if rng.random() < 0.25 else "words", "value_digits": rng.choice((5, 6, 6, 7))}


class PromptBuilder:
    """Token ids of ``prefix + context + query + answer region`` through pdllm.tokenizer's template.

    The prefix and query come from ``Tokenizer.long_context_prompt`` itself (with a stand-in
    context), the context ids from the example, which equal the tokenizer's encoding of its text.
    """

    def __init__(self, tok: Tokenizer, answer_length: int):
        self.tok, self.answer_length = tok, answer_length
        self._query_cache: dict[str, list[int]] = {}
        self.prefix = tok.long_context_prompt(".", "?").prefix

    def query(self, question: str) -> list[int]:
        q = self._query_cache.get(question)
        if q is None:
            if len(self._query_cache) > 50_000:
                self._query_cache.clear()
            p = self.tok.long_context_prompt(".", question)
            assert p.prefix == self.prefix, "the prompt prefix must not depend on the question"
            q = self._query_cache[question] = p.query
        return q

    def answer(self, answer: str) -> list[int]:
        ids = self.tok.encode(answer)
        if len(ids) > self.answer_length:
            raise ValueError(f"answer {answer!r} has {len(ids)} tokens > answer_length={self.answer_length}")
        return ids + [self.tok.eos_id] * (self.answer_length - len(ids))


class StepBatches(torch.utils.data.IterableDataset):
    """Yields the training batch of every step in order; worker w makes the steps s = w mod W."""

    def __init__(self, cfg: TrainConfig, tokenizer_json: str):
        self.cfg, self.tokenizer_json = cfg, tokenizer_json

    def __iter__(self):
        from tokenizers import Tokenizer as HFTokenizer

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        tok = Tokenizer(HFTokenizer.from_str(self.tokenizer_json))
        builder, enc = PromptBuilder(tok, self.cfg.answer_length), piece_encoder(tok.tk)
        for step in range(wid, self.cfg.steps_to_run, nw):
            yield make_train_batch(self.cfg, step, builder, enc)


def make_train_batch(cfg: TrainConfig, step: int, builder: PromptBuilder, enc) -> dict:
    """The batch of one step: idx (B, T) left-padded with EOS, masked tokens replaced by [MASK];
    pos (B, T); valid (B, T) False on padding; target (B, T); masked (B, T); p_mask (B,);
    n_maskable (B,); sft (B,) True for SFT rows (their answer is the last answer_length columns);
    task (B,) the task of each SFT row (len(tasks) for pretraining rows)."""
    rng = random.Random(f"train:{cfg.seed}:{step}")
    tok, A = builder.tok, cfg.answer_length
    L = context_length_for_step(cfg, step, rng)
    overhead = len(builder.prefix) + 32 + A
    B = max(1, cfg.tokens_per_batch // (L + overhead))
    tasks, weights = cfg.task_list, cfg.task_weight_list
    is_sft = [rng.random() >= cfg.pretrain_frac for _ in range(B)]
    rows, task_ids = [], []
    for i in range(B):
        if not is_sft[i]:
            continue
        t_id = rng.choices(range(len(tasks)), weights)[0]
        ex = make_example(tasks[t_id], L, None, f"train.{cfg.seed}.{step}.{i}", enc,
                          **task_kwargs(tasks[t_id], rng, L, cfg.needle_spacing, cfg.min_needles))
        context = list(ex.context_ids)
        if rng.random() < cfg.passage_frac:
            context = split_passages(context, rng, tok.bos_id, cfg.passage_min, cfg.passage_max)
        rows.append(builder.prefix + context + builder.query(ex.question) + builder.answer(ex.answer))
        task_ids.append(t_id)
    T = max(map(len, rows)) if rows else overhead + L
    pretrain_rows = [packed_sequence(T, rng, enc, tok.bos_id) for _ in range(B - len(rows))]
    idx, valid, pos = left_pad(rows + pretrain_rows, tok.eos_id)
    sft = torch.tensor([True] * len(rows) + [False] * len(pretrain_rows))
    task = torch.tensor(task_ids + [len(tasks)] * len(pretrain_rows))
    target = idx.clone()
    g = torch.Generator().manual_seed(rng.getrandbits(63))
    t = torch.rand(B, generator=g)
    # With t ~ U(0, 1) most rows show some answer digits, and the model can find the needle by
    # matching them (copy the number that continues the revealed digits) without reading the
    # question's key; decoding starts from a fully masked answer, where that shortcut is useless.
    # Rows with t = 1 train the step that matters: pick the needle by its key.
    t = torch.where(sft & (torch.rand(B, generator=g) < cfg.full_mask_frac), 1.0, t)
    p_mask = (1 - MASK_EPS) * t + MASK_EPS
    maskable = valid & ~sft[:, None]  # pretraining rows: every token
    maskable[:, -A:] |= sft[:, None]  # SFT rows: the answer region
    masked = (torch.rand(B, idx.shape[1], generator=g) < p_mask[:, None]) & maskable
    idx = torch.where(masked, tok.mask_id, idx)
    return {"idx": idx, "pos": pos, "valid": valid, "target": target, "masked": masked, "p_mask": p_mask,
            "n_maskable": maskable.sum(dim=1), "answer_length": torch.tensor(A), "context": torch.tensor(L),
            "sft": sft, "task": task}


def diffusion_loss(model, batch: dict, n_tasks: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA's loss: per sequence, the cross-entropy of the masked tokens weighted by 1/p, summed
    and divided by the number of maskable tokens (the answer length for SFT rows, the sequence
    length for pretraining rows); the batch mean. Also the accuracy on masked answer tokens of the
    SFT rows, over the batch and per task (hits and counts, (n_tasks, 2)), to see which task is
    being learnt.
    """
    idx, pos, valid = batch["idx"], batch["pos"], batch["valid"]
    target, masked, p_mask = batch["target"], batch["masked"], batch["p_mask"]
    T, A = idx.shape[1], int(batch["answer_length"])
    first = 0 if bool(masked[:, : T - A].any()) else T - A  # logits only where something is masked
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    logits = model(idx, pos, mask=mask, logits_slice=slice(first, None)).float()  # (B, T - first, V)
    tgt, msk = target[:, first:], masked[:, first:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
    loss = ((ce * msk) / p_mask[:, None]).sum(dim=1) / batch["n_maskable"]
    with torch.no_grad():
        ans = msk[:, -A:] & batch["sft"][:, None]
        row_hits = ((logits[:, -A:].argmax(-1) == tgt[:, -A:]) & ans).sum(dim=1)  # (B,)
        hit = row_hits.sum() / ans.sum().clamp_min(1)
        task = batch["task"].clamp_max(n_tasks - 1) if n_tasks > 1 else torch.zeros_like(row_hits)
        per_task = torch.zeros(n_tasks, 2, device=row_hits.device)
        per_task.index_add_(0, task, torch.stack([row_hits, ans.sum(dim=1)], dim=1).float())
    return loss.mean(), hit, per_task


@torch.no_grad()
def init_for_training(model: Transformer, embedding_std: float):
    """Token embeddings N(0, embedding_std); everything else as ``Transformer.init_weights``.

    Why not 0.02 everywhere (LLaDA's init): with tiny embeddings a small model did not learn to
    find a value by its key. On multi-query associative recall (benchmarks/probe_mqar_init.py: 4
    pairs, 4 layers, d 128) pdllm's model stayed at 0.33-0.47 exact through 5000 steps with
    embeddings N(0, 0.02) and reached 0.98 with N(0, 1)."""
    if embedding_std != Transformer.INIT_STD:
        torch.nn.init.normal_(model.tok_emb.weight, 0.0, embedding_std)


@torch.no_grad()
def grow_layers(state: dict, old_layers: int, new_layers: int) -> dict:
    """A checkpoint's weights for a model ``new_layers // old_layers`` times as deep: old layer i
    becomes layers r*i .. r*i + r - 1, the first an exact copy, the others copies whose residual
    outputs (attention output and MLP down projections) are zero. A block with a zero output adds
    nothing to the residual stream, so the grown model computes what the checkpoint did and
    training starts from a model that already does the tasks (function-preserving growth, as in
    Net2Net); the copies start from weights that already attend somewhere useful."""
    if new_layers % old_layers:
        raise ValueError(f"n_layers={new_layers} must be a multiple of the checkpoint's {old_layers} layers to grow it")
    r, out = new_layers // old_layers, {}
    for key, value in state.items():
        if not key.startswith("blocks."):
            out[key] = value
            continue
        _, i, rest = key.split(".", 2)
        for j in range(r):
            silent = j > 0 and rest in ("attn.o.weight", "mlp.down.weight")
            out[f"blocks.{int(i) * r + j}.{rest}"] = torch.zeros_like(value) if silent else value.clone()
    return out


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


# ---------------------------------------------------------------------------------------------
# Evaluation: dense greedy masked-diffusion decoding on held-out examples
# ---------------------------------------------------------------------------------------------

EVAL_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def evaluate(model, tok: Tokenizer, cfg: TrainConfig, lengths) -> dict:
    """Exact-match accuracy per task and length (and per depth), vanilla dense decoding."""
    from pdllm.eval.harness import run_examples
    from pdllm.sampler import GenerationConfig

    gen = GenerationConfig(gen_length=cfg.answer_length, block_length=cfg.answer_length,
                           steps=cfg.eval_steps or cfg.answer_length, temperature=0.0, remasking="low_confidence")
    per_cell = max(1, cfg.eval_n // len(EVAL_DEPTHS))
    results: dict = {"generation": asdict(gen), "method": "vanilla", "examples_per_task_and_length":
                     per_cell * len(EVAL_DEPTHS), "tasks": {}}
    for task in cfg.task_list:
        for L in lengths:
            grid = make_grid(task, [L], EVAL_DEPTHS, per_cell, seed=f"heldout-{cfg.seed}", tokenizer=tok.tk)
            exs = [e for cell in grid.values() for e in cell]
            correct = [r["correct"] for r in run_examples(model, tok, exs, gen, "vanilla", cfg.eval_batch)]
            by_depth = {str(d): sum(c for c, e in zip(correct, exs) if e.depth == d) / per_cell for d in EVAL_DEPTHS}
            results["tasks"].setdefault(task, {})[str(L)] = {
                "accuracy": sum(correct) / len(correct), "n": len(correct), "by_depth": by_depth}
            print(f"eval {task:16s} L={L:5d}  acc={sum(correct) / len(correct):.3f}  by depth {by_depth}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------


def _recipe_table(recipe: dict | None) -> str:
    if not recipe:
        return ""
    rows = [f"| {i + 1} | `{st['name']}` | {st.get('what', '')} | "
            f"{st.get('stop_at') or st.get('steps')} | {st.get('ran_here', '')} |"
            for i, st in enumerate(recipe["stages"])]
    return ("The model is built by its recipe, `" + recipe["path"] + "`, stage after stage, each stage one run of "
            "this trainer initialised from the weights of the stage before (a fresh optimizer):\n\n"
            "| stage | name | what | steps | |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n")


def write_model_card(out: Path, cfg: TrainConfig, mcfg: ModelConfig, info: dict, results: dict):
    n_params, env = info["n_params"], info.get("environment", {})
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    lengths = sorted({L for t in results["tasks"].values() for L in t}, key=int)
    rows = []
    for task, by_len in results["tasks"].items():
        rows.append(f"| {task} | " + " | ".join(f"{by_len[L]['accuracy']:.3f}" for L in lengths) + " |")
    depth_rows = []
    for task, by_len in results["tasks"].items():
        r = by_len[lengths[-1]]["by_depth"]
        depth_rows.append(f"| {task} | " + " | ".join(f"{r[str(d)]:.2f}" for d in EVAL_DEPTHS) + " |")
    recipe = info.get("recipe")
    grown = info.get("grown_from_layers")
    card = f"""# pdllm toy LLaDA-format model

A small masked-diffusion language model in the **LLaDA checkpoint format** (config.json with
LLaDA/OLMo names, model.safetensors with HF LLaDA keys, tokenizer.json with LLaDA's special
tokens), trained from scratch by `pdllm.train_toy` on synthetic long-context retrieval. It is
**not** LLaDA-8B and knows no language beyond its synthetic tasks: it stands in for a pretrained
dLLM so that pdllm can measure what sparse prefill (Prefilling-dLLM) does to answers without
downloading real weights. This card is written by the trainer.

## Model
| | |
|---|---|
| architecture | bidirectional pre-norm transformer, RMSNorm, RoPE (theta {mcfg.rope_theta:g}), SiLU-gated MLP, no biases, untied head |
| d_model / layers / heads / head_dim | {mcfg.d_model} / {mcfg.n_layers} / {mcfg.n_heads} / {mcfg.head_dim} |
| MLP hidden | {mcfg.mlp_hidden} |
| vocabulary | {mcfg.vocab_size} (byte-level BPE, digits split; mask id {mcfg.mask_id}, BOS {mcfg.bos_id}, EOS/pad {mcfg.eos_id}) |
| parameters | {n_params / 1e6:.2f} M |
| file | model.safetensors, bf16, {size_mb:.1f} MB |
| trained sequence length | {mcfg.max_positions} positions (contexts up to {cfg.max_context} tokens = {cfg.max_context // cfg.chunk_size} chunks of {cfg.chunk_size}) |
| Prefilling-dLLM chunk size | {cfg.chunk_size} |

## Data
Generated on the fly by `pdllm.data.synthetic` from the seed (nothing downloaded); tasks
{', '.join(cfg.task_list)}, mixed {"with weights " + cfg.task_weights if cfg.task_weights else "uniformly"}; needle depth uniform in [0, 1]. The tasks:
- `passkey`: "The pass key is NNNNN. Remember it. NNNNN is the pass key." in generated prose (4-6 digits).
- `multikey_needle`: {cfg.min_needles}-6 needles "One of the special magic numbers for <adj-noun> is: NNNNNNN."
  (at most one per {cfg.needle_spacing} context tokens) plus 0-3 distractors whose key shares a word with the asked key.
- `kv_lookup`: lines "<key>: <value>" (word-pair keys, or 25% uuid-like keys), 5-7 digit values.

Rows of this stage's batches ({cfg.tokens_per_batch} tokens per batch; context length curriculum
from {cfg.min_context} to {cfg.max_context} tokens over the first {cfg.curriculum_frac:.0%} of training, {cfg.long_frac:.0%} of batches at the
current longest length, the rest uniform below it):
- **SFT rows** ({1 - cfg.pretrain_frac:.0%}): the LLaDA chat template of `pdllm.tokenizer` (`long_context_prompt`:
  instruction, context, question), then an answer region of {cfg.answer_length} tokens (the answer's
  digits, then `<|endoftext|>` padding); only the answer is ever masked.
- **passage rows** ({cfg.passage_frac:.0%} of the SFT rows): the context cut into passages of
  {cfg.passage_min}-{cfg.passage_max} tokens at any token, each led by BOS, as a retrieval-augmented
  prompt hands a model its documents.
- **pretraining rows** ({cfg.pretrain_frac:.0%}): documents (prose, lists, written-out task records with
  their question and answer) of 32-512 tokens, each led by BOS, packed into one sequence; every
  token maskable.

Why: a model pretrained on packed corpora has seen a BOS in the middle of a sequence at every
document boundary, and has learnt to read on past it; that is what makes Prefilling-dLLM's BOS
anchor in front of every chunk harmless to LLaDA and useful as an attention sink. A toy model
trained only on one plain context per row has never seen one, and an anchor then breaks its
reading (the earlier 4-layer model: top-4 of 16 at 1024 tokens 0.794 with anchors, 0.839
without). Packed rows put the BOS in distribution for the reason real models have it; passage
rows are the instruction-tuning counterpart (contexts that arrive as several documents).

## Training
LLaDA objective (t ~ U(0,1) per sequence; maskable tokens masked with probability t;
cross-entropy on masked tokens weighted by 1/t, per sequence over the maskable length, batch
mean){f"; {cfg.full_mask_frac:.0%} of SFT rows with the whole answer masked (t = 1): with t ~ U(0,1) most rows show some digits of the answer, and a model learns to copy the number that continues them instead of finding the needle by its key, which is what decoding from a fully masked answer needs" if cfg.full_mask_frac > 0 else ""}.
AdamW (betas 0.9/0.95, weight decay {cfg.weight_decay}), peak lr {cfg.lr}, {cfg.warmup} warm-up steps, cosine to
{cfg.min_lr_ratio:g} x over {cfg.steps} steps, gradient clip {cfg.grad_clip}, bf16 autocast on CUDA.

{_recipe_table(recipe)}{f"- initialised from the weights of `{Path(info['init_from']).name}` (a fresh optimizer); the steps below are this run's" + chr(10) if info.get('init_from') else ""}{f"- grown from {grown} to {mcfg.n_layers} layers (`grow_layers`: each layer followed by copies of itself whose output projections are zero, so training starts from the checkpoint's function)" + chr(10) if grown else ""}- steps: {info['steps_done']}{f" (STOPPED EARLY of {cfg.steps_to_run} planned: time limit)" if info['steps_done'] < cfg.steps_to_run else ""}, seed: {cfg.seed}, tokens seen: {info['tokens_seen'] / 1e6:.1f} M
- final training loss (last 10% of steps): {info['final_loss']:.4f}; accuracy on masked answer tokens {info['final_masked_acc']:.3f}
- wall time: {info['train_seconds'] / 60:.1f} min training, {info['total_seconds'] / 60:.1f} min in all, on {info['device_name']}
- torch {env.get('torch', torch.__version__)}, Python {env.get('python', platform.python_version())}
- command: `{info['command']}`

## Dense accuracy (held-out)
Exact match of the decoded answer, greedy masked-diffusion decoding with the `vanilla` (dense)
method of `pdllm.sampler`: gen_length = block_length = {cfg.answer_length}, steps =
{results['generation']['steps']}, temperature 0, low-confidence remasking. {results['examples_per_task_and_length']} held-out examples per task and
length (seed `heldout-{cfg.seed}`), spread evenly over depths {', '.join(map(str, EVAL_DEPTHS))}.

| task | {' | '.join(f'L={L}' for L in lengths)} |
|---|{'---|' * len(lengths)}
{chr(10).join(rows)}

By depth at L={lengths[-1]}:

| task | {' | '.join(f'depth {d}' for d in EVAL_DEPTHS)} |
|---|{'---|' * len(EVAL_DEPTHS)}
{chr(10).join(depth_rows)}

With Prefilling-dLLM (recall of the needle's chunk, the depth x length grid to 4x the trained
length, ablations): `pdllm eval --model DIR` (the embedded model's results, with the command that
made them: `benchmarks/results/toy_eval_<gpu>.json` and its plots).

## Use
```python
from pdllm.checkpoint import from_pretrained
from pdllm.tokenizer import Tokenizer
from pdllm.sampler import GenerationConfig, generate
model, tok = from_pretrained("{out.name}"), Tokenizer.from_dir("{out.name}")
prompt = tok.long_context_prompt(context, "What is the pass key?")
out = generate(model, [prompt], GenerationConfig(gen_length={cfg.answer_length}, block_length={cfg.answer_length}, steps={cfg.answer_length}),
               method="prefill", chunk_size={cfg.chunk_size}, top_k=4)
print(tok.decode(out.tokens[0]))
```
Special tokens have LLaDA's strings at small ids (look them up by string).
"""
    (out / "README.md").write_text(card)


# ---------------------------------------------------------------------------------------------
# Recipes: a file of stages, each one run of this trainer
# ---------------------------------------------------------------------------------------------


def load_recipe(path: Path) -> list[dict]:
    """The ``STAGES`` of a recipe file: a Python file (as nanoGPT's config/*.py) that assigns
    ``STAGES = [dict(name=..., what=..., <TrainConfig field>=..., ...), ...]``."""
    if not path.is_file():
        raise SystemExit(f"error: --recipe {path} does not exist; pass the recipe file (the embedded model's is "
                         "src/pdllm/assets/toy/recipe.py)")
    scope: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), scope)  # a recipe is code the user pointed at
    stages = scope.get("STAGES")
    fields = set(TrainConfig.__dataclass_fields__)
    if not isinstance(stages, list) or not stages:
        raise SystemExit(f"error: {path} defines no STAGES list")
    for st in stages:
        unknown = set(st) - fields - {"name", "what"}
        if "name" not in st or unknown:
            raise SystemExit(f"error: {path}: stage {st.get('name')!r} has no name or unknown keys {sorted(unknown)}")
    return stages


def stage_argv(stage: dict) -> list[str]:
    argv = []
    for k, v in stage.items():
        if k in ("name", "what"):
            continue
        argv += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)]
    return argv


def run_recipe(args) -> int:
    """Run the recipe's stages from ``--from-stage`` on, each initialised from the one before
    (the first from ``--init-from`` when given); the last stage writes ``--out`` itself."""
    path = Path(args.recipe)
    stages = load_recipe(path)
    names = [st["name"] for st in stages]
    if args.from_stage and args.from_stage not in names:
        raise SystemExit(f"error: --from-stage {args.from_stage!r} is not a stage of {path}; stages: {names}")
    first = names.index(args.from_stage) if args.from_stage else 0
    if first > 0 and not args.init_from:
        raise SystemExit(f"error: --from-stage {args.from_stage} needs --init-from DIR, the output of stage "
                         f"{names[first - 1]!r}")
    out = Path(args.out)
    init = args.init_from
    ran = {first - 1: f"earlier; its output is --init-from `{Path(args.init_from or '').name}`"}
    shown = [dict(st, ran_here="this run" if i >= first else ran.get(i, "earlier")) for i, st in enumerate(stages)]
    recipe_info = {"path": path.name, "stages": [{k: v for k, v in st.items() if k in
                                                  ("name", "what", "steps", "stop_at", "ran_here")} for st in shown]}
    for i in range(first, len(stages)):
        target = out if i == len(stages) - 1 else out / "stages" / names[i]
        argv = ["--out", str(target)] + stage_argv(stages[i])
        argv += ["--init-from", str(init)] if init else []
        argv += ["--device", args.device] if args.device else []
        print(f"===== recipe {path.name}: stage {i + 1}/{len(stages)} {names[i]} =====", flush=True)
        train(*parse_args(argv), argv, recipe=recipe_info if i == len(stages) - 1 else None)
        init = target
    shutil.copy(path, out / "recipe.py")
    return 0


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> tuple[argparse.Namespace, TrainConfig]:
    from pdllm.knobs import ArgumentParser  # bad flags: one line, no usage dump

    ap = ArgumentParser(prog="pdllm train-toy", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--recipe", default=None, metavar="FILE", help="run the stages of this recipe file")
    ap.add_argument("--from-stage", default=None, metavar="NAME",
                    help="with --recipe: start at this stage (--init-from is then the stage before's output)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model for a few CPU steps (tests)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; smoke: cpu)")
    ap.add_argument("--init-from", default=None, metavar="DIR",
                    help="start from this toy checkpoint's weights (its sizes, or a multiple of its layers: "
                         "see grow_layers; a fresh optimizer)")
    fields = TrainConfig.__dataclass_fields__
    for name, f in fields.items():
        if name == "eval_lengths":
            ap.add_argument("--eval-lengths", type=lambda s: tuple(int(x) for x in s.split(",") if x), default=None,
                            help="comma-separated context lengths to evaluate (default: max_context)")
            continue
        ap.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=None,
                        help=f"default {f.default} (smoke: {SMOKE.get(name, f.default)})")
    args = ap.parse_args(argv)
    if args.recipe:
        return args, None
    values = {**(SMOKE if args.smoke else {})}
    values.update({k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    args.grow_from = None
    if args.init_from:  # the model's sizes come from the checkpoint; a flag may only repeat them
        from pdllm.checkpoint import load_config

        try:
            ckpt = load_config(Path(args.init_from))
        except (OSError, ValueError) as e:
            ap.error(f"--init-from {args.init_from}: {e}")
        sizes = {"d_model": ckpt.d_model, "n_layers": ckpt.n_layers, "n_heads": ckpt.n_heads,
                 "mlp_hidden": ckpt.mlp_hidden, "rope_theta": ckpt.rope_theta}
        for name, value in sizes.items():
            given = getattr(args, name)
            if name == "n_layers" and given is not None and given != value and given % value == 0:
                args.grow_from = value  # deeper by a whole multiple: grown (see grow_layers)
                continue
            if given is not None and given != value:
                hint = f" or a multiple of {value} to grow it" if name == "n_layers" else ""
                ap.error(f"--{name.replace('_', '-')} {given} does not match the checkpoint in --init-from "
                         f"({value}); drop the flag or pass {value}{hint}")
            values[name] = value
    cfg = TrainConfig(**values)
    if cfg.needle_spacing < 1 or not 1 <= cfg.min_needles <= 6:
        ap.error("need needle_spacing >= 1 and 1 <= min_needles <= 6")
    if not (0 < cfg.curriculum_frac <= 1 and 0 <= cfg.long_frac <= 1):
        ap.error("need 0 < curriculum_frac <= 1 and 0 <= long_frac <= 1")
    if not (0 <= cfg.pretrain_frac < 1 and 0 <= cfg.passage_frac <= 1 and 1 <= cfg.passage_min <= cfg.passage_max):
        ap.error("need 0 <= pretrain_frac < 1, 0 <= passage_frac <= 1 and 1 <= passage_min <= passage_max")
    if cfg.max_context < cfg.min_context or cfg.min_context < 16:
        ap.error("need 16 <= min_context <= max_context")
    if cfg.d_model % cfg.n_heads:
        ap.error("d_model must be divisible by n_heads")
    try:
        cfg.task_weight_list  # checks the task names too
    except ValueError as e:
        ap.error(str(e))
    return args, cfg


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    if args.recipe:
        return run_recipe(args)
    return train(args, cfg, argv)


def train(args: argparse.Namespace, cfg: TrainConfig, argv, recipe: dict | None = None) -> int:
    """One run of the trainer, as parse_args(argv) configured it (argv is recorded as its command)."""
    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tok = Tokenizer(build_toy_tokenizer(seed=0))
    builder = PromptBuilder(tok, cfg.answer_length)
    longest_query = max(len(builder.query(q)) for q in (
        "What is the pass key?", "What is the special magic number for wandering-meadowlark-meadowlark?",
        "What is the value of the key wandering-meadowlark-meadowlark?", "What is the value of the key ffffffff-ffff?"))
    passage_bos = -(-cfg.max_context // cfg.passage_min) if cfg.passage_frac > 0 else 0
    max_seq = len(builder.prefix) + cfg.max_context + passage_bos + 24 + longest_query + cfg.answer_length
    mcfg = ModelConfig(arch="llada", vocab_size=tok.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, mlp_hidden=cfg.mlp_hidden,
                       rope_theta=cfg.rope_theta, max_positions=64 * math.ceil(max_seq / 64),
                       mask_id=tok.mask_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg)
    init_for_training(model, cfg.embedding_std)
    if args.init_from:  # weights only: RoPE tables follow this run's max_positions
        init = from_pretrained(args.init_from, dtype=torch.float32)
        if init.cfg.vocab_size != mcfg.vocab_size or Tokenizer.from_dir(args.init_from).tk.to_str() != tok.tk.to_str():
            raise SystemExit(f"--init-from {args.init_from}: its tokenizer is not the toy tokenizer this trainer builds")
        state = init.state_dict()
        if args.grow_from:
            state = grow_layers(state, args.grow_from, mcfg.n_layers)
        model.load_state_dict(state)
        print(f"initialised from {args.init_from}" + (f", grown from {args.grow_from} layers" if args.grow_from else ""),
              flush=True)
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: d={mcfg.d_model} layers={mcfg.n_layers} heads={mcfg.n_heads} mlp={mcfg.mlp_hidden} "
          f"vocab={mcfg.vocab_size} params={n_params / 1e6:.2f}M max_positions={mcfg.max_positions}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if cuda else {}))

    workers = cfg.workers if cfg.workers >= 0 else max(0, min(8, (os.cpu_count() or 2) - 1))
    loader = torch.utils.data.DataLoader(
        StepBatches(cfg, tok.tk.to_str()), batch_size=None, num_workers=workers, pin_memory=cuda,
        **({"prefetch_factor": 4, "persistent_workers": False} if workers else {}))

    log, tokens_seen, n_steps = [], 0, cfg.steps_to_run
    run_loss, run_acc, run_n = torch.zeros((), device=device), torch.zeros((), device=device), 0
    run_task = torch.zeros(len(cfg.task_list), 2, device=device)  # masked answer hits, counts per task
    t_train = time.time()
    model.train()
    stopped_at = None
    for step, batch in enumerate(loader):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, acc, per_task = diffusion_loss(model, batch, len(cfg.task_list))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens_seen += batch["idx"].numel()
        run_loss += loss.detach()
        run_acc += acc
        run_task += per_task
        run_n += 1
        if (step + 1) % cfg.log_every == 0 or step == n_steps - 1:  # means since the last line
            lv, av = run_loss.item() / run_n, run_acc.item() / run_n
            task_acc = {t: round(h / max(n, 1), 4) for t, (h, n) in zip(cfg.task_list, run_task.tolist())}
            run_loss.zero_(), run_acc.zero_(), run_task.zero_()
            run_n = 0
            el = time.time() - t_train
            eta = el / (step + 1) * (n_steps - step - 1)
            rec = {"step": step, "loss": lv, "masked_acc": av, "lr": lr_at(cfg, step), "grad_norm": float(gnorm),
                   "context": int(batch["context"]), "batch": batch["idx"].shape[0], "elapsed_s": el,
                   "masked_acc_by_task": task_acc}
            log.append(rec)
            print(f"step {step:5d}/{n_steps}  L={rec['context']:5d} B={rec['batch']:4d}  loss {lv:.4f}  "
                  f"masked acc {av:.3f} ({' '.join(f'{a:.2f}' for a in task_acc.values())})  lr {rec['lr']:.2e}  |g| {rec['grad_norm']:.2f}  "
                  f"{tokens_seen / max(el, 1e-9) / 1e3:.0f}K tok/s  eta {eta / 60:.1f} min", flush=True)
        if step < n_steps - 1 and time.time() - t_train > 60 * cfg.max_train_minutes:
            stopped_at = step + 1
            print(f"WARNING: stopping after {stopped_at} of {n_steps} steps: past --max-train-minutes "
                  f"{cfg.max_train_minutes} (the learning rate did not finish its decay)", flush=True)
            break
    del loader
    train_seconds = time.time() - t_train

    # save in bf16, with the tokenizer, then evaluate the saved checkpoint itself
    model.eval()
    save_model = Transformer(mcfg)
    save_model.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_pretrained(save_model.to(torch.bfloat16), out)
    save_tokenizer(out, tok.tk)
    del model, save_model, opt
    eval_dtype = torch.bfloat16 if cuda else torch.float32
    loaded = from_pretrained(out, dtype=eval_dtype, device=device)
    lengths = cfg.eval_lengths or (cfg.max_context,)
    results = evaluate(loaded, Tokenizer.from_dir(out), cfg, lengths)

    done = stopped_at or n_steps
    tail = [r for r in log if r["step"] >= 0.9 * done - 1] or log[-1:]
    info = {"n_params": n_params, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
            "steps_done": done, "total_seconds": time.time() - t_start,
            "final_loss": sum(r["loss"] for r in tail) / len(tail),
            "final_masked_acc": sum(r["masked_acc"] for r in tail) / len(tail),
            "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or 'cpu'})",
            "environment": environment(), "init_from": args.init_from, "grown_from_layers": args.grow_from, "recipe": recipe,
            "command": "python -m pdllm.train_toy " + " ".join(shlex.quote(a) for a in
                                                               (sys.argv[1:] if argv is None else argv))}
    (out / "train_log.json").write_text(json.dumps({"config": asdict(cfg), "model": asdict(mcfg), "info": info,
                                                    "log": log}, indent=1) + "\n")
    (out / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    write_model_card(out, cfg, mcfg, info, results)
    print(f"wrote {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB) in "
          f"{info['total_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
