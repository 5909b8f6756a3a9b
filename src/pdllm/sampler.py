"""The one sampler: LLaDA's block-wise masked-diffusion decoding, with Fast-dLLM's threshold
parallel decoding, and decoding methods as small strategies for the current block's logits.

    x = prompt + [MASK] * gen_length, split into blocks of block_length
    for each block:
        for each step (steps // num_blocks of them, or until the block is full with a threshold):
            logits = method.block_logits(model, x, start, end, step)   # the only thing a method changes
            x0 = argmax(logits (+ Gumbel noise));  confidence = p(x0) (or random)
            unmask the most confident masked positions of the block

A method is an object with ``name``, ``supports_cfg`` (whether it can run classifier-free
guidance's unconditional rows), ``stats`` (a dict merged into the output's), ``begin(model,
batch)`` (called once: build caches, score chunks ...) and ``block_logits(model, x, start, end,
step)`` returning (B, end - start, V) logits that predict the tokens of x[:, start:end] (``step``
counts the steps of the current block from 0). Built in here: ``vanilla`` (the whole sequence
every step), ``prefix`` and ``dual`` (Fast-dLLM's KV caches, refreshed at the first step of each
block). Prefilling-dLLM (``prefill``) and the baselines (``dllm_cache``, ``dyllm``) plug in the
same way. Every method class registers itself in pdllm.methods.METHODS, the registry names resolve in.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pdllm.notices import PdllmWarning
from pdllm.cache import DenseKVCache
from pdllm.graphs import capture, graphs_available
from pdllm.methods import METHODS, make_method

REMASKING = ("low_confidence", "random")
_warned: set[str] = set()


def warn_once(key: str, message: str):
    """A PdllmWarning shown once per process: a loop over requests must not repeat it."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, PdllmWarning, stacklevel=3)


@dataclass
class GenerationConfig:
    gen_length: int = 128
    block_length: int = 32
    steps: int = 128  # over all blocks; ignored when threshold is set (a block runs until full)
    temperature: float = 0.0
    remasking: str = field(default="low_confidence", metadata={"choices": REMASKING})
    threshold: float | None = None  # Fast-dLLM parallel decoding: unmask all with confidence >= threshold
    cfg_scale: float = 0.0  # classifier-free guidance (unconditional = prompt masked out)

    def __post_init__(self):
        problems = []
        if self.gen_length < 1 or self.block_length < 1:
            problems.append("gen_length and block_length must be >= 1")
        elif self.gen_length % self.block_length:
            problems.append(f"gen_length={self.gen_length} must be a multiple of block_length={self.block_length}")
        elif self.threshold is None and (self.steps < self.num_blocks or self.steps % self.num_blocks):
            problems.append(f"steps={self.steps} must be a positive multiple of the number of blocks ({self.num_blocks})")
        if self.remasking not in REMASKING:
            problems.append(f"remasking={self.remasking!r} must be one of {REMASKING}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            problems.append(f"threshold={self.threshold} must be in (0, 1]")
        if self.temperature < 0 or self.cfg_scale < 0:
            problems.append("temperature and cfg_scale must be >= 0")
        if problems:
            raise ValueError("invalid generation config: " + "; ".join(problems))
        if self.threshold is None and self.steps > self.gen_length:
            warn_once("steps", f"steps={self.steps} is more than gen_length={self.gen_length}: a step unmasks at "
                      f"least one token, so decoding takes {self.gen_length} steps (set steps <= gen_length)")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


# ---------------------------------------------------------------------------------------------
# The pieces of one step (LLaDA's reference semantics)
# ---------------------------------------------------------------------------------------------


def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Even schedule: (B,) masked counts -> (B, steps) tokens to unmask per step, remainder first."""
    base, remainder = mask_count // steps, mask_count % steps
    schedule = base[:, None].repeat(1, steps)
    schedule += torch.arange(steps, device=mask_count.device)[None, :] < remainder[:, None]
    return schedule


def add_gumbel_noise(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gumbel-max sampling as LLaDA does it, in float64 (low precision hurts quality)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits)
    return logits.exp() / (-torch.log(noise)) ** temperature


def select_transfer(confidence: torch.Tensor, k: torch.Tensor | None, threshold: float | None) -> torch.Tensor:
    """Which positions to unmask. confidence (B, L) with -inf where not allowed.

    Fixed schedule: the k[b] most confident. Threshold (Fast-dLLM): every position with
    confidence >= threshold, and always the single most confident one so each step makes progress.
    """
    allowed = confidence > float("-inf")
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)  # rank[b, i] = place of position i in the sorted order
    if threshold is None:
        return (rank < k[:, None]) & allowed
    return ((rank == 0) | (confidence >= threshold)) & allowed


# ---------------------------------------------------------------------------------------------
# Batches: left padding, a real padding mask, per-row positions
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """What a method gets at ``begin``: the padded sequence and its layout."""

    x: torch.Tensor  # (B, T) tokens: [pad] prompt [MASK] * gen_length
    pos: torch.Tensor  # (B, T) position ids (padding does not shift positions)
    key_mask: torch.Tensor | None  # (B, T) False on padding, None when there is none
    prompt_len: int  # T - gen_length: where generation starts
    prompts: list  # the prompts as given (token lists, or structured prompts for prefill)
    config: GenerationConfig
    mask_id: int


def left_pad(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one length: x (B, T), valid (B, T) False on padding, and
    positions (B, T) that count real tokens only, so padding shifts no row's positions."""
    T, B = max(map(len, rows)), len(rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        x[b, T - len(r) :] = torch.as_tensor(r, dtype=torch.long)
        valid[b, : T - len(r)] = False
    return x, valid, (valid.cumsum(dim=1) - 1).clamp_min(0)


def make_batch(model, prompts, config: GenerationConfig, pad_id: int) -> Batch:
    rows = [_prompt_ids(p) for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: every prompt needs at least one token")
    P, mask_id = max(map(len, rows)), model.cfg.mask_id
    x, valid, pos = left_pad([r + [mask_id] * config.gen_length for r in rows], pad_id)
    dev = model.device
    key_mask = None if valid.all() else valid.to(dev)
    return Batch(x.to(dev), pos.to(dev), key_mask, P, list(prompts), config, mask_id)


def warn_beyond_trained_positions(model, method, batch: Batch):
    """Warn once when decoding places tokens beyond the positions the model was trained on. A method
    that lays its rows out itself (prefill: the selected chunks, packed) says how many positions it
    uses (``positions_used``); the others run the padded sequence as it is."""
    used = getattr(method, "positions_used", None)
    used = batch.prompt_len + batch.config.gen_length if used is None else used
    if used > model.cfg.max_positions:
        warn_once("positions", f"{method.name} places this request's tokens at {used} positions (prompt "
                  f"{batch.prompt_len} + answer {batch.config.gen_length} tokens), more than the "
                  f"{model.cfg.max_positions} positions the model was trained on (config.json max_sequence_length "
                  "or max_position_embeddings); answers may degrade")


def begin_method(model, method, batch: Batch) -> tuple[float, float]:
    """The method's ``begin`` (caches, chunk selection) between two synchronised clock reads, and the
    trained-length warning for the positions it laid out. Returns the two clock reads."""
    synchronize(model.device)
    t0 = time.perf_counter()
    method.begin(model, batch)
    warn_beyond_trained_positions(model, method, batch)
    synchronize(model.device)
    return t0, time.perf_counter()


def _prompt_ids(p) -> list[int]:
    if hasattr(p, "token_ids"):  # structured prompt (pdllm.prefill.LongContextPrompt)
        return list(p.token_ids())
    if isinstance(p, torch.Tensor):
        return p.reshape(-1).tolist()
    return list(p)


# ---------------------------------------------------------------------------------------------
# Methods: how the current block's logits are computed
# ---------------------------------------------------------------------------------------------


@METHODS.register
class Vanilla:
    """The reference: the whole sequence through the model at every step."""

    name = "vanilla"
    supports_cfg = True  # runs the unconditional half of a classifier-free-guidance batch like any other row

    def __init__(self):
        self.stats: dict = {}

    def begin(self, model, batch: Batch):
        self.batch = batch

    def block_logits(self, model, x, start, end, step):
        shift = model.cfg.logit_shift  # Dream: logits at i predict token i + 1
        b = self.batch
        mask = None if b.key_mask is None else b.key_mask[:, None, None, :]
        return model(x, b.pos, mask=mask, logits_slice=slice(start - shift, end - shift))


class DenseCache:
    """Fast-dLLM KV caching. At the first step of a block (and every ``refresh_every`` steps) the
    whole sequence runs and fills the cache; other steps run only the block (``dual``) or the
    block and everything after it (``prefix``) against the cached rows."""

    dual: bool  # set by the two registered kinds below
    supports_cfg = True

    def __init__(self, refresh_every: int | None = None, cuda_graphs: bool = True):
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(f"refresh_every={refresh_every} must be >= 1 (or None: once per block)")
        self.refresh_every = refresh_every
        self.cuda_graphs, self.graph = cuda_graphs, None  # replay cached steps from a CUDA graph
        self.stats: dict = {}

    def begin(self, model, batch: Batch):
        self.batch, self.graph = batch, None  # a graph of an earlier call would replay on its old cache
        self.cache = DenseKVCache.for_model(model, batch.x.shape[0], batch.x.shape[1], batch.key_mask)

    def block_logits(self, model, x, start, end, step):
        shift, b = model.cfg.logit_shift, self.batch
        refresh = step == 0 or (self.refresh_every is not None and step % self.refresh_every == 0)
        q0 = 0 if refresh else start - shift  # first row this forward runs
        q1 = x.shape[1] if (refresh or not self.dual) else end
        if not refresh and self.graph is not None and self.graph.key == (q0, q1, start, end):
            return self.graph(x[:, q0:q1])

        cache = self.cache  # not self: a captured graph keeps `forward`, and self keeps the graph (a cycle)

        def forward(tokens):
            cache.window(q0)
            return model(tokens, b.pos[:, q0:q1], cache=cache, logits_slice=slice(start - shift - q0, end - shift - q0))

        if not refresh and self.cuda_graphs and graphs_available(x.device):
            self.graph = capture(forward, x[:, q0:q1], key=(q0, q1, start, end))
            if self.graph is not None:
                return self.graph(x[:, q0:q1])
        return forward(x[:, q0:q1])


@METHODS.register
class PrefixCache(DenseCache):
    """Fast-dLLM's prefix cache: cached steps run the block and everything after it."""

    name, dual = "prefix", False


@METHODS.register
class DualCache(DenseCache):
    """Fast-dLLM's dual cache: cached steps run the block alone, against cached prefix and suffix."""

    name, dual = "dual", True


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (B, gen_length) the generated tokens (untruncated)
    nfe: int  # number of block-logit evaluations (model forwards)
    stats: dict = field(default_factory=dict)  # timings in seconds, method-specific figures


def synchronize(device):
    """Wait for the GPU, so that wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_to_fill(schedule: torch.Tensor) -> int:
    """Steps a block runs under a fixed schedule (B, steps): up to the last step that unmasks a
    token in any row (each step unmasks exactly schedule[:, step], so the block is full then)."""
    busy = schedule.any(dim=0).nonzero()
    return int(busy.max()) + 1 if len(busy) else 0


class StepTimer:
    """Splits each step into the method's forward and the sampler's work, without a host sync.

    On a GPU, ``mark()`` records a CUDA event in the stream (the host does not wait) and the
    durations are read once at the end: what is measured is the GPU's timeline, so a step the host
    queues ahead costs its GPU time, and a step the GPU waits for (capture, eager launches) costs
    its wall time. On a CPU the marks read the host clock.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def split(self) -> tuple[list[float], list[float]]:
        """(forward ms per step, sampler ms per step), from three marks per step."""
        if self.cuda and self.marks:
            self.marks[-1].synchronize()
        ms = [a.elapsed_time(b) if self.cuda else 1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]
        return ms[0::3], ms[1::3]


@torch.no_grad()
def generate(model, prompts, config: GenerationConfig | None = None, method="vanilla", pad_id: int | None = None,
             callback=None, time_steps: bool = False, **method_kwargs) -> GenerationOutput:
    """Generate for a batch of prompts (token lists, a (B, P) tensor, or structured prompts).

    callback(event: dict) is called after every step with the block range, the tokens and
    which positions were unmasked (used by the visualiser).
    time_steps: also report, per step, the time of the method's forward (``stats["model_ms"]``) and
    of the sampler's work on its logits (``stats["sampler_ms"]``); see StepTimer.
    """
    config = config or GenerationConfig()
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 1 or hasattr(prompts, "token_ids"):
        prompts = [prompts]
    method = make_method(method, **method_kwargs)
    pad_id = model.cfg.eos_id if pad_id is None else pad_id
    batch = make_batch(model, prompts, config, pad_id)
    mask_id, dev = batch.mask_id, model.device
    x, P = batch.x, batch.prompt_len
    un_prompt = None
    if config.cfg_scale > 0:  # unconditional rows: the prompt masked out, run as a second half
        if not method.supports_cfg:
            raise ValueError(f"cfg_scale > 0 is not supported by method {method.name!r} (it does not run the "
                             "unconditional rows); set cfg_scale=0 or use a method whose supports_cfg is True")
        is_pad = torch.zeros_like(x[:, :P], dtype=torch.bool) if batch.key_mask is None else ~batch.key_mask[:, :P]
        un_prompt = torch.where(is_pad, x[:, :P], mask_id)
        keys = None if batch.key_mask is None else batch.key_mask.repeat(2, 1)
        batch = Batch(torch.cat([x, torch.cat([un_prompt, x[:, P:]], 1)]), batch.pos.repeat(2, 1), keys, P,
                      batch.prompts * 2, config, mask_id)
    t0, t1 = begin_method(model, method, batch)  # caches, chunk selection: before the first step
    nfe, B = 0, x.shape[0]
    timer = StepTimer(dev) if time_steps else None
    for blk in range(config.num_blocks):
        s, e = P + blk * config.block_length, P + (blk + 1) * config.block_length
        schedule = n_steps = None
        if config.threshold is None:
            schedule = num_transfer_tokens((x[:, s:e] == mask_id).sum(dim=1), config.steps_per_block)
            n_steps = steps_to_fill(schedule)  # known up front: the one host sync of the block
        step = 0
        # A fixed schedule needs no look at x between steps, so the host queues step after step
        # without waiting for the GPU; a threshold decides from the tokens (one small sync per step).
        while step < n_steps if schedule is not None else bool((x[:, s:e] == mask_id).any()):
            if timer:
                timer.mark()
            masked = x[:, s:e] == mask_id
            run_x = x if un_prompt is None else torch.cat([x, torch.cat([un_prompt, x[:, P:]], 1)])
            logits = method.block_logits(model, run_x, s, e, step).float()  # (B or 2B, L, V)
            if timer:
                timer.mark()
            nfe += 1
            if config.cfg_scale > 0:
                cond, uncond = logits.chunk(2)
                logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
            logits[..., mask_id] = float("-inf")  # never "decode" a position back to [MASK]: no progress, no end
            x0 = add_gumbel_noise(logits, config.temperature).argmax(dim=-1)  # (B, L)
            if config.remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            else:
                conf = torch.rand(x0.shape, device=x0.device)
            conf = torch.where(masked, conf, float("-inf"))
            k = None if schedule is None else schedule[:, step]
            transfer = select_transfer(conf, k, config.threshold)
            x[:, s:e] = torch.where(transfer, x0, x[:, s:e])
            if timer:
                timer.mark()
            if callback is not None:
                callback({"block": blk, "step": step, "start": s, "end": e, "x": x, "transfer": transfer,
                          "confidence": conf})
            step += 1
    synchronize(dev)
    t2 = time.perf_counter()
    stats = {"method": method.name, "begin_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0, "nfe": nfe,
             "batch": B, "gen_length": config.gen_length, **method.stats}
    if timer:
        stats["model_ms"], stats["sampler_ms"] = timer.split()
    return GenerationOutput(tokens=x[:, P:].clone(), nfe=nfe, stats=stats)

