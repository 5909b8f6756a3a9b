"""A LLaDA-style bidirectional transformer in one file (Dream-7B is a config switch).

Read top to bottom:
  1. ModelConfig   the hyper-parameters, built from a checkpoint's config.json
  2. the layers    RMSNorm (fp32), RoPE (fp32, rotate-half, explicit positions), attention with one
                   QKV matrix, MLP with one gate+up matrix; the block as two functions of tensors
                   that torch.compile fuses on a GPU (block_backend), eagerly the same math elsewhere
  3. Transformer   embedding -> blocks -> norm -> head, with an optional KV cache to attend to
  4. checkpoints   one HF->ours name map per architecture (the fused matrices as their HF parts);
                   from_pretrained / save_pretrained

Differences from an autoregressive LLaMA: attention is bidirectional (no causal mask), every token
gets an explicit position id (Prefilling-dLLM moves chunks around), and a forward can run a block
of tokens against cached K/V of other tokens. K is cached *after* RoPE, so a cache is
position-free: whoever reads it never needs to know where its rows came from.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pdllm.attention import dense_attention

# ---------------------------------------------------------------------------------------------
# 1. Config
# ---------------------------------------------------------------------------------------------

ARCHS = ("llada", "dream")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    arch: str = "llada"  # "llada" (OLMo-style names) or "dream" (Qwen2-style names)
    vocab_size: int = 126464
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads means grouped-query attention (Dream: 28 / 4)
    mlp_hidden: int = 12288
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Dream has q/k/v biases
    tie_embeddings: bool = False
    max_positions: int = 4096  # trained context; RoPE itself has no limit
    mask_id: int = 126336
    bos_id: int | None = 126080
    eos_id: int | None = 126081

    def __post_init__(self):
        problems = []
        if self.arch not in ARCHS:
            problems.append(f"arch={self.arch!r} is not one of {ARCHS}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "max_positions"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("mask_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if (value is not None or name == "mask_id") and not _is_int(value):
                problems.append(f"{name}={value!r} must be a token id (an integer)")
        for name in ("rope_theta", "norm_eps"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be a number")
        if not problems:
            if self.d_model % self.n_heads:
                problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            elif self.head_dim % 2:
                problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
            if not 0 <= self.mask_id < self.vocab_size:
                problems.append(f"mask_id={self.mask_id} is outside the vocabulary (size {self.vocab_size})")
            if not (self.rope_theta > 0 and self.norm_eps > 0):
                problems.append("rope_theta and norm_eps must be positive")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def logit_shift(self) -> int:
        """Dream is AR-initialised: the logit at position i predicts token i + 1."""
        return 1 if self.arch == "dream" else 0

    # HF config.json <-> ModelConfig. One table per architecture: (ours, theirs, default).
    HF_NAMES = {
        "llada": [
            ("vocab_size", "embedding_size", None), ("d_model", "d_model", None),
            ("n_layers", "n_layers", None), ("n_heads", "n_heads", None),
            ("n_kv_heads", "n_kv_heads", "n_heads"), ("mlp_hidden", "mlp_hidden_size", None),
            ("rope_theta", "rope_theta", 10000.0), ("norm_eps", "rms_norm_eps", 1e-5),
            ("qkv_bias", "include_bias", False), ("tie_embeddings", "weight_tying", False),
            ("max_positions", "max_sequence_length", 4096), ("mask_id", "mask_token_id", 126336),
            ("bos_id", "bos_token_id", 126080), ("eos_id", "eos_token_id", 126081),
        ],
        "dream": [
            ("vocab_size", "vocab_size", None), ("d_model", "hidden_size", None),
            ("n_layers", "num_hidden_layers", None), ("n_heads", "num_attention_heads", None),
            ("n_kv_heads", "num_key_value_heads", "n_heads"), ("mlp_hidden", "intermediate_size", None),
            ("rope_theta", "rope_theta", 10000.0), ("norm_eps", "rms_norm_eps", 1e-6),
            ("qkv_bias", None, True), ("tie_embeddings", "tie_word_embeddings", False),
            ("max_positions", "max_position_embeddings", 32768), ("mask_id", "mask_token_id", 151666),
            ("bos_id", "bos_token_id", 151643), ("eos_id", "eos_token_id", 151643),
        ],
    }

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        model_type = str(hf.get("model_type", "")).lower()
        if model_type == "llada" or "d_model" in hf:
            arch = "llada"
        elif model_type == "dream" or "hidden_size" in hf:
            arch = "dream"
        else:
            raise ValueError(f"{source}: unknown model (model_type={hf.get('model_type')!r}); "
                             "pdllm loads LLaDA (OLMo-style keys such as d_model) and Dream (Qwen2-style keys such as hidden_size)")
        if arch == "llada" and hf.get("layer_norm_type", "rms") != "rms":
            raise ValueError(f"{source}: layer_norm_type={hf['layer_norm_type']!r}; LLaDA models use 'rms'")
        kw = {"arch": arch}
        for ours, theirs, default in cls.HF_NAMES[arch]:
            if theirs is not None and ours == "vocab_size" and theirs not in hf:
                theirs = "vocab_size"  # older LLaDA configs give only vocab_size
            if theirs is not None and hf.get(theirs) is not None:
                value = hf[theirs]
            elif isinstance(default, str):  # default is another field, e.g. n_kv_heads <- n_heads
                value = kw.get(default)
            elif default is None:
                raise ValueError(f"{source}: required key {theirs!r} is missing (needed for {ours})")
            else:
                value = default
            kw[ours] = value
        if isinstance(kw["eos_id"], list) and kw["eos_id"]:
            kw["eos_id"] = kw["eos_id"][0]
        try:
            cfg = cls(**kw)
        except ValueError as e:  # name the keys as the file spells them
            message = str(e)
            for ours, theirs, _ in cls.HF_NAMES[arch]:
                if theirs is not None and theirs != ours:
                    message = re.sub(rf"\b{ours}=", f"{theirs}=", message)
            raise ValueError(f"{source}: {message}") from e
        for ours, theirs, _ in cls.HF_NAMES[arch]:  # a checkpoint's BOS/EOS must be real tokens of its vocabulary
            value = getattr(cfg, ours)
            if ours in ("bos_id", "eos_id") and value is not None and not 0 <= value < cfg.vocab_size:
                given = "" if theirs in hf else " (the default; the file does not set it)"
                raise ValueError(f"{source}: {theirs}={value}{given} is outside the vocabulary (size "
                                 f"{cfg.vocab_size}); set {theirs} to the tokenizer's id for that token")
        return cfg

    def to_hf(self) -> dict:
        hf = {"model_type": self.arch if self.arch == "llada" else "Dream", "architectures":
              ["LLaDAModelLM" if self.arch == "llada" else "DreamModel"]}
        if self.arch == "llada":
            hf.update(layer_norm_type="rms", vocab_size=self.vocab_size, activation_type="silu")
        for ours, theirs, _ in self.HF_NAMES[self.arch]:
            if theirs is not None:
                hf[theirs] = getattr(self, ours)
        return hf


# ---------------------------------------------------------------------------------------------
# 2. Layers
# ---------------------------------------------------------------------------------------------
#
# The block's math is written as plain functions of tensors (rms_norm, attention_inputs,
# block_output): the modules below own the weights and call them, and the same functions are what
# torch.compile fuses when the model's ``block_backend`` is "compiled" (a function of tensors
# compiles once for all 32 layers; a method of each layer's module would compile per layer).


def rms_norm(x, weight, eps: float):
    """RMSNorm computed in fp32 (as LLaDA and Qwen2 do), weight applied in the model dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float):
    """cos/sin tables (B, T, head_dim) in fp32 for explicit positions pos (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    freqs = pos.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): rotate-half layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate x (B, h, T, D) by its tokens' angles, in fp32; returns x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def split_heads(qkv, cos, sin, n_heads: int, n_kv_heads: int):
    """The fused projection (B, T, (H + 2 Hkv) D) -> q (B, H, T, D), k, v (B, Hkv, T, D); q, k rotated."""
    B, T, _ = qkv.shape
    heads = qkv.view(B, T, n_heads + 2 * n_kv_heads, -1).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
    q, k, v = heads.split([n_heads, n_kv_heads, n_kv_heads], dim=1)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_inputs(x, norm_weight, eps: float, w_qkv, b_qkv, cos, sin, n_heads: int, n_kv_heads: int):
    """A block's first half up to attention: pre-norm, one QKV GEMM, RoPE (q, k, v as split_heads)."""
    return split_heads(F.linear(rms_norm(x, norm_weight, eps), w_qkv, b_qkv), cos, sin, n_heads, n_kv_heads)


def mlp(x, w_gate_up, w_down):
    """SiLU-gated MLP down(silu(gate(x)) * up(x)), gate and up as one GEMM."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def block_output(x, y, w_o, norm_weight, eps: float, w_gate_up, w_down):
    """A block's second half from attention's output y (B, H, T, D): o-projection and residual,
    pre-norm MLP and residual."""
    B, H, T, D = y.shape
    x = x + F.linear(y.transpose(1, 2).reshape(B, T, H * D), w_o)
    return x + mlp(rms_norm(x, norm_weight, eps), w_gate_up, w_down)


class Attention(nn.Module):
    """q, k, v projections as one (d_model + 2 kv_dim, d_model) matrix: one GEMM reads them all.
    The checkpoint keeps them apart (q_proj, k_proj, v_proj): see FUSED in section 4. Block.forward
    runs the attention (attention_inputs, attend, block_output); the methods here serve the cache
    methods that run a layer's pieces themselves (dLLM-Cache, DyLLM)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.sizes = _parts(cfg, "attn.wqkv")  # rows of q | k | v in wqkv
        self.wqkv = nn.Linear(cfg.d_model, sum(self.sizes), bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _projection(self, x, part: int):
        start = sum(self.sizes[:part])
        rows = slice(start, start + self.sizes[part])
        bias = None if self.wqkv.bias is None else self.wqkv.bias[rows]
        return F.linear(x, self.wqkv.weight[rows], bias)

    # One projection alone (B, T, C) -> (B, T, h * D), for cache methods that need only some of them.
    def q(self, x):
        return self._projection(x, 0)

    def k(self, x):
        return self._projection(x, 1)

    def v(self, x):
        return self._projection(x, 2)

    def qkv(self, x, rope):
        """x (B, T, C) -> q (B, H, T, D), k and v (B, Hkv, T, D); q and k rotated."""
        return split_heads(self.wqkv(x), *rope, self.n_heads, self.n_kv_heads)

    def out(self, y):
        """(B, H, T, D) -> (B, T, C) through the output projection."""
        B, _, T, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, mask, cache, layer: int, backend: str):
    """Plain bidirectional self-attention over the tokens given, or, with a cache, the cache
    stores k, v where they belong and attends over what it holds."""
    if cache is None:
        return dense_attention(q, k, v, mask, backend)
    return cache.attend(layer, q, k, v, mask, backend)


class MLP(nn.Module):
    """SiLU-gated MLP; gate and up as one (2 mlp_hidden, d_model) matrix (gate rows first)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return mlp(x, self.gate_up.weight, self.down.weight)


BLOCK_BACKENDS = ("auto", "eager", "compiled")  # auto: compiled on a GPU, eager elsewhere


class Block(nn.Module):
    """Pre-norm block. Its parts are public so cache methods (dLLM-Cache, DyLLM) can reuse them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask=None, cache=None, layer=0, backend="sdpa", block_backend="eager", linears=None):
        """``linears``: another copy of the four matrices with the halves that take them (pdllm.fp8's
        Fp8Weights: ``halves(block_backend, device)`` and ``layers[layer]``), or None for the module's own."""
        a = self.attn
        if linears is None:
            first, second = _block_halves(block_backend, x.device)
            w_qkv, w_o, w_gate_up, w_down = a.wqkv.weight, a.o.weight, self.mlp.gate_up.weight, self.mlp.down.weight
        else:
            first, second = linears.halves(block_backend, x.device)
            mine = linears.layers[layer]
            w_qkv, w_o, w_gate_up, w_down = mine.wqkv, mine.wo, mine.gate_up, mine.down
        q, k, v = first(x, self.attn_norm.weight, self.attn_norm.eps, w_qkv, a.wqkv.bias, *rope, a.n_heads, a.n_kv_heads)
        y = attend(q, k, v, mask, cache, layer, backend)
        return second(x, y, w_o, self.mlp_norm.weight, self.mlp_norm.eps, w_gate_up, w_down)


_COMPILED: dict = {}


def _block_halves(block_backend: str, device: torch.device):
    """(attention_inputs, block_output) for a block backend. "compiled": torch.compile fuses each
    half's elementwise work (fp32 norm, RoPE, SiLU x up, residual adds) around its GEMMs. Shapes
    are dynamic after the first change, so a new length does not recompile. Where compiling is not
    possible (no compiler for the device), the eager functions run, with one warning."""
    if block_backend == "auto":
        block_backend = "compiled" if device.type == "cuda" else "eager"
    if block_backend == "eager":
        return attention_inputs, block_output
    if block_backend != "compiled":
        raise ValueError(f"unknown block backend {block_backend!r}; choose one of {BLOCK_BACKENDS}")
    if "halves" not in _COMPILED:
        _COMPILED["halves"] = tuple(_compiled_or_eager(f) for f in (attention_inputs, block_output))
    return _COMPILED["halves"]


def _compiled_or_eager(fn):
    compiled = torch.compile(fn, fullgraph=True)

    def run(*args):
        if _COMPILED.get("failed"):
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as e:  # a compiler missing or failing must not fail the answer
            out = fn(*args)  # raises again if the inputs, not the compiler, were the problem
            import warnings

            warnings.warn(f"pdllm: torch.compile of the block failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); running eagerly", stacklevel=3)
            _COMPILED["failed"] = True
            return out

    return run


# ---------------------------------------------------------------------------------------------
# 3. The model
# ---------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    INIT_STD = 0.02  # LLaDA's init: N(0, 0.02) for every matrix

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.attention_backend = "sdpa"  # see pdllm.attention.BACKENDS
        self.block_backend = "auto"  # see BLOCK_BACKENDS: "compiled" fuses the elementwise work
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = INIT_STD, generator: torch.Generator | None = None):
        """Normal(0, std) for matrices, ones for norms, zeros for biases (also on a GPU after to_empty)."""
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)

    def rope(self, pos):
        return rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta)

    def forward(self, idx, pos, mask=None, cache=None, logits_slice: slice | None = None, return_hidden=False,
                stop_after: int | None = None, linears=None):
        """idx, pos (B, T) -> logits (B, T', V) for the positions in logits_slice (default all).

        mask:  bool, broadcastable to (B, H, T, Tk), True = may attend. Tk is T without a cache,
               else the number of rows the cache reads.
        cache: an object with attend(layer, q, k, v, mask, backend) (see pdllm.cache).
        stop_after: run only the first N blocks and return their output (B, T, C), before the final
               norm and head: early-exit scoring reads the attention of those layers and needs no more.
        linears: the blocks' matrices in another form (pdllm.fp8.Fp8Weights: the scoring forward's
               FP8 linear layers); None: the model's own.
        """
        if idx.shape != pos.shape:
            raise ValueError(f"idx {tuple(idx.shape)} and pos {tuple(pos.shape)} must have the same (B, T) shape")
        if stop_after is not None and not 1 <= stop_after <= self.cfg.n_layers:
            raise ValueError(f"stop_after={stop_after} must be in [1, n_layers={self.cfg.n_layers}]")
        x = self.run_layers(self.tok_emb(idx), pos, 0, stop_after or self.cfg.n_layers, mask, cache, linears)
        if stop_after is not None:
            return x
        if logits_slice is not None:
            x = x[:, logits_slice]
        x = self.norm_f(x)
        return x if return_hidden else self.lm_head(x)  # (B, T', V)

    def run_layers(self, x, pos, start: int, stop: int, mask=None, cache=None, linears=None):
        """Blocks [start, stop) on the residual stream x (B, T, C) of tokens at positions pos: a
        forward in stages (cascaded scoring runs every chunk to one layer, the best further)."""
        rope = self.rope(pos)
        for i in range(start, stop):
            x = self.blocks[i](x, rope, mask, cache, i, self.attention_backend, self.block_backend, linears)
        return x

    @property
    def device(self):
        return self.tok_emb.weight.device

    @property
    def dtype(self):
        return self.tok_emb.weight.dtype


def build_random(cfg: ModelConfig, dtype=torch.bfloat16, device="cuda", seed: int = 0) -> Transformer:
    """A model with random weights, built on the meta device and filled where it lives (gpt-fast
    style): an 8B model never touches CPU memory. Used for speed work, never for answers."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator=gen)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# 4. Checkpoints: HF directory <-> our names
# ---------------------------------------------------------------------------------------------

# (HF name, our name) per architecture; {i} is a layer index, {p} is "weight" or "bias". Our names
# here are the checkpoint's tensors one to one; the model fuses some of them (FUSED, below).
HF_KEY_MAP = {
    "llada": [
        ("model.transformer.wte.weight", "tok_emb.weight"),
        ("model.transformer.blocks.{i}.attn_norm.weight", "blocks.{i}.attn_norm.weight"),
        ("model.transformer.blocks.{i}.q_proj.{p}", "blocks.{i}.attn.q.{p}"),
        ("model.transformer.blocks.{i}.k_proj.{p}", "blocks.{i}.attn.k.{p}"),
        ("model.transformer.blocks.{i}.v_proj.{p}", "blocks.{i}.attn.v.{p}"),
        ("model.transformer.blocks.{i}.attn_out.weight", "blocks.{i}.attn.o.weight"),
        ("model.transformer.blocks.{i}.ff_norm.weight", "blocks.{i}.mlp_norm.weight"),
        ("model.transformer.blocks.{i}.ff_proj.weight", "blocks.{i}.mlp.gate.weight"),  # the gate
        ("model.transformer.blocks.{i}.up_proj.weight", "blocks.{i}.mlp.up.weight"),
        ("model.transformer.blocks.{i}.ff_out.weight", "blocks.{i}.mlp.down.weight"),
        ("model.transformer.ln_f.weight", "norm_f.weight"),
        ("model.transformer.ff_out.weight", "lm_head.weight"),
    ],
    "dream": [
        ("model.embed_tokens.weight", "tok_emb.weight"),
        ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
        ("model.layers.{i}.self_attn.q_proj.{p}", "blocks.{i}.attn.q.{p}"),
        ("model.layers.{i}.self_attn.k_proj.{p}", "blocks.{i}.attn.k.{p}"),
        ("model.layers.{i}.self_attn.v_proj.{p}", "blocks.{i}.attn.v.{p}"),
        ("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.o.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
        ("model.layers.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.gate.weight"),
        ("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.mlp.up.weight"),
        ("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down.weight"),
        ("model.norm.weight", "norm_f.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
}


def _rename(name: str, pairs) -> str | None:
    """Rename through (from, to) template pairs; None if no template matches."""
    for src, dst in pairs:
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        m = re.fullmatch(pattern, name)
        if m:
            return dst.format(**m.groupdict())
    return None


def hf_to_ours(arch: str, key: str) -> str | None:
    return _rename(key, HF_KEY_MAP[arch])


def ours_to_hf(arch: str, name: str) -> str:
    hf = _rename(name, [(dst, src) for src, dst in HF_KEY_MAP[arch]])
    if hf is None:
        raise KeyError(f"no HF name for parameter {name!r}")
    return hf


# Our fused parameters and the checkpoint tensors they are made of, concatenated along the rows in
# this order: the model runs one GEMM for q, k and v and one for gate and up, the checkpoint keeps
# the HF tensors. from_pretrained fuses after every tensor is checked, save_pretrained splits.
FUSED = {"attn.wqkv": ("attn.q", "attn.k", "attn.v"), "mlp.gate_up": ("mlp.gate", "mlp.up")}
_FUSED_NAME = re.compile(r"(blocks\.\d+\.)(attn\.wqkv|mlp\.gate_up)\.(weight|bias)")


def _parts(cfg: ModelConfig, fused: str) -> tuple[int, ...]:
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    return (cfg.d_model, kv_dim, kv_dim) if fused == "attn.wqkv" else (cfg.mlp_hidden, cfg.mlp_hidden)


def unfuse_state(cfg: ModelConfig, state: dict) -> dict:
    """Our parameters by checkpoint tensor: each fused one split into its parts (row views)."""
    out = {}
    for name, t in state.items():
        m = _FUSED_NAME.fullmatch(name)
        if m is None:
            out[name] = t
            continue
        prefix, fused, p = m.groups()
        for part, rows in zip(FUSED[fused], t.split(_parts(cfg, fused))):
            out[f"{prefix}{part}.{p}"] = rows
    return out


def fuse_state(cfg: ModelConfig, state: dict) -> dict:
    """The inverse of unfuse_state: every fused parameter's parts concatenated, in FUSED order.

    Consumes ``state``: each part is dropped from it as its fused parameter is made, so a load holds
    one copy of the weights (plus one fused parameter) on the device, not the parts and the fused
    copies together."""
    groups: dict[str, dict[str, str]] = {}  # fused name -> {part: its name in state}
    part_of = {part: fused for fused, parts in FUSED.items() for part in parts}
    for name in state:
        m = re.fullmatch(r"(blocks\.\d+\.)(attn\.[qkv]|mlp\.gate|mlp\.up)\.(weight|bias)", name)
        if m is not None:
            prefix, part, p = m.groups()
            groups.setdefault(f"{prefix}{part_of[part]}.{p}", {})[part] = name
    out = {}
    for name, parts in groups.items():
        fused = _FUSED_NAME.fullmatch(name).group(2)
        out[name] = torch.cat([state.pop(parts[part]) for part in FUSED[fused]])
    out.update(state)  # what is not fused, as it is
    return out


def checkpoint_shapes(model: "Transformer") -> dict:
    """The shape of every tensor a checkpoint of this model holds, by our (unfused) name."""
    return {n: t.shape for n, t in unfuse_state(model.cfg, dict(model.named_parameters())).items()}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file/key and the fix."""


def _allowed_roots(path: Path) -> list[Path]:
    """Where a checkpoint's files may live once links are resolved: the directory itself, and for a
    Hugging Face cache snapshot (<repo>/snapshots/<rev>/, whose files link to <repo>/blobs/) the
    repository's blobs folder. Nothing else is ever opened."""
    roots = [path.resolve()]
    if path.resolve().parent.name == "snapshots":
        roots.append(path.resolve().parent.parent / "blobs")
    return roots


def checkpoint_file(path: Path, name: str, source: str, missing: str | None = None) -> Path:
    """The regular file `name` inside checkpoint directory `path`, resolved; a CheckpointError for a
    name that leaves the directory (absolute, '..', a link pointing out), is missing (`missing` is
    that message) or is not a regular file (a named pipe would block the loader, a device would be
    read forever). `source` says who named the file (e.g. the index entry), for the message."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{source}: {name!r} is not a file name; give a file name inside {path}")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{source}: {name!r} points outside the checkpoint directory {path}; "
                              "only files inside it are read (give a plain file name such as model-00001.safetensors)")
    if not os.path.lexists(path / name):
        raise CheckpointError(missing or f"{source}: {name!r} is not in {path}; copy it there")
    target = (path / name).resolve()
    if not any(target.is_relative_to(root) for root in _allowed_roots(path)):
        raise CheckpointError(f"{source}: {name!r} is a link to {target}, outside the checkpoint directory {path}; "
                              "copy the file into the directory instead of linking to it")
    try:
        mode = os.stat(target).st_mode  # stat, never open: opening a named pipe blocks
    except OSError as e:
        raise CheckpointError(f"{source}: cannot read {name!r} in {path} ({e.strerror}); copy the file there") from e
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{source}: {name!r} in {path} is not a regular file (a pipe, device or directory); "
                              "replace it with the real file")
    return target


def read_checkpoint_json(path: Path, name: str, missing: str | None = None):
    """Parse the JSON file `name` of a checkpoint directory (checked as in checkpoint_file)."""
    file = checkpoint_file(path, name, str(path / name), missing)
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path / name}: invalid JSON ({e}); restore the file from the checkpoint") from e


def _weight_files(path: Path) -> dict[Path, list[str] | None]:
    """Map each safetensors file to the HF keys the index says it holds (None: no index)."""
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):
        content = read_checkpoint_json(path, index.name)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: not a valid safetensors index; it needs a 'weight_map' object "
                                  "mapping each tensor name to its shard file")
        names: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            if not isinstance(fname, str):
                raise CheckpointError(f"{index}: weight_map[{key!r}] is {fname!r}, not a shard file name")
            names.setdefault(fname, []).append(key)
        files: dict[Path, list[str]] = {}
        for fname, keys in names.items():
            missing = (f"missing shard {fname} (listed in {index.name} for {len(keys)} tensors, e.g. {keys[0]!r}); "
                       f"download or copy it into {path}")
            files.setdefault(checkpoint_file(path, fname, f"{index.name} entry {keys[0]!r}", missing), []).extend(keys)
        return files
    single = path / "model.safetensors"
    if os.path.lexists(single):
        return {checkpoint_file(path, single.name, str(path)): None}
    found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = f" (found {found}: pickle files are never loaded; convert them to safetensors)" if found else ""
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg_file = path / "config.json"
    hf = read_checkpoint_json(path, "config.json", f"{path}: config.json is missing; a HF checkpoint directory needs one")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file}: holds a JSON {type(hf).__name__}, not an object of model settings; "
                              "restore the checkpoint's config.json")
    try:
        return ModelConfig.from_hf(hf, str(cfg_file))
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from e


def _read_weights(path: Path, cfg: ModelConfig, expected: dict, dtype: torch.dtype, device) -> dict:
    """Every tensor of the checkpoint, checked (name, shard, shape, dtype, finite) and put on `device`."""
    from safetensors import SafetensorError, safe_open

    files = _weight_files(path)
    shard_of = {key: file.name for file, keys in files.items() for key in keys or []}
    state, origin, unexpected, extremes = {}, {}, [], []
    for file, listed in files.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                for key in listed or []:
                    if key not in keys:
                        raise CheckpointError(f"{file.name}: the index lists {key!r} in this shard but it is not there")
                for key in keys:
                    if listed is not None and key not in listed:  # the index puts it elsewhere, or nowhere
                        where = f"the index assigns to {shard_of[key]}" if key in shard_of else "the index does not list"
                        raise CheckpointError(f"{file.name}: holds {key!r}, which {where}; a tensor must be in "
                                              "exactly the shard the index names (restore the shard or the index)")
                    name = hf_to_ours(cfg.arch, key)
                    if name is None or name not in expected:
                        unexpected.append(f"{key} ({file.name})")
                        continue
                    if name in state:
                        raise CheckpointError(f"{file.name}: {key} is also in {origin[name]}; keep one copy")
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(expected[name]):
                        raise CheckpointError(f"{file.name}: {key} has shape {tuple(t.shape)}, expected "
                                              f"{tuple(expected[name])} from config.json; is this the right config?")
                    if not t.is_floating_point():
                        raise CheckpointError(f"{file.name}: {key} has dtype {t.dtype}; weights must be floating point")
                    state[name], origin[name] = t.to(device=device, dtype=dtype), file.name
                    extremes.append(torch.stack(torch.aminmax(state[name])))  # NaN and +-Inf survive min/max
        except CheckpointError:
            raise
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e}); it is truncated or corrupt, "
                                  "download it again") from e
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                              f"for a {cfg.arch} model with {cfg.n_layers} layers; is config.json right?")
    missing = [ours_to_hf(cfg.arch, n) for n in expected if n not in state]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    finite = torch.stack(extremes).isfinite().all(dim=1).tolist()  # one device sync for the whole model
    if not all(finite):
        name = list(state)[finite.index(False)]
        raise CheckpointError(f"{origin[name]}: {ours_to_hf(cfg.arch, name)} holds NaN or Inf values in {dtype}; "
                              "the file is corrupt (download it again) or its values overflow this dtype "
                              "(load in bfloat16 or float32)")
    return state


def from_pretrained(path: str | Path, dtype: torch.dtype | str = torch.bfloat16, device="cpu") -> Transformer:
    """Load a HF LLaDA/Dream checkpoint directory with safetensors, checking every key and shape.

    Only regular files inside `path` are opened (see checkpoint_file); every problem is a
    CheckpointError that names the file and key."""
    path = Path(path)
    cfg = load_config(path)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or not getattr(torch, dtype).is_floating_point:
            raise ValueError(f"dtype {dtype!r} is not a floating torch dtype (use float32, bfloat16 or float16)")
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = checkpoint_shapes(model)  # by checkpoint tensor (fused parameters as their parts); tied weights once
    state = _read_weights(path, cfg, expected, dtype, device)
    model.load_state_dict(fuse_state(cfg, state), assign=True, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def save_pretrained(model: Transformer, path: str | Path, max_shard_bytes: int | None = None):
    """Write config.json + model.safetensors (or shards + index when max_shard_bytes is set)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    tensors = {ours_to_hf(cfg.arch, n): p.detach().cpu().contiguous()
               for n, p in unfuse_state(cfg, dict(model.named_parameters())).items()}
    if max_shard_bytes is None:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for key, t in tensors.items():
        if current and size + t.numel() * t.element_size() > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += t.numel() * t.element_size()
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["ModelConfig", "Transformer", "Block", "RMSNorm", "rope_cos_sin", "apply_rope", "build_random",
           "rms_norm", "attention_inputs", "block_output", "BLOCK_BACKENDS", "fuse_state", "unfuse_state",
           "from_pretrained", "save_pretrained", "load_config", "CheckpointError", "checkpoint_file", "hf_to_ours", "ours_to_hf"]
