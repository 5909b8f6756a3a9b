"""A LLaDA-style bidirectional transformer in one file (Dream-7B is a config switch).

Read top to bottom:
  1. ModelConfig   the hyper-parameters, built from a checkpoint's config.json
  2. the layers    RMSNorm (fp32), RoPE (fp32, rotate-half, explicit positions), attention with one
                   QKV matrix, MLP with one gate+up matrix; the block as two functions of tensors
                   that torch.compile fuses on a GPU (block_backend), eagerly the same math elsewhere
  3. Transformer   embedding -> blocks -> norm -> head, with an optional KV cache to attend to;
                   build_random for speed work. Checkpoints are read and written by pdllm.checkpoint.

Differences from an autoregressive LLaMA: attention is bidirectional (no causal mask), every token
gets an explicit position id (Prefilling-dLLM moves chunks around), and a forward can run a block
of tokens against cached K/V of other tokens. K is cached *after* RoPE, so a cache is
position-free: whoever reads it never needs to know where its rows came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pdllm.attention import dense_attention
from pdllm.compiled import compiled

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


def block_output(x, attn_out, norm_weight, eps: float, w_gate_up, w_down):
    """A block's second half from its attention's o-projection: residual, pre-norm MLP, residual."""
    x = x + attn_out
    return x + mlp(rms_norm(x, norm_weight, eps), w_gate_up, w_down)


# The fused matrices' row layout: attn.wqkv is q | k | v, mlp.gate_up is gate | up (the checkpoint
# keeps the parts apart; pdllm.checkpoint splits and joins them with these sizes).
def _parts(cfg: ModelConfig, fused: str) -> tuple[int, ...]:
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    return (cfg.d_model, kv_dim, kv_dim) if fused == "attn.wqkv" else (cfg.mlp_hidden, cfg.mlp_hidden)


class Attention(nn.Module):
    """q, k, v projections as one (d_model + 2 kv_dim, d_model) matrix: one GEMM reads them all.
    The checkpoint keeps them apart (q_proj, k_proj, v_proj): see pdllm.checkpoint.FUSED. Block.forward
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

    def forward(self, x, rope, mask=None, cache=None, layer=0, backend="sdpa",
                halves=(attention_inputs, block_output), linears=None):
        """``halves``: the block's two halves as the model runs them; ``linears``: another copy of the
        matrices (pdllm.fp8.Fp8Weights) for ``halves`` that take it and run the o-projection too."""
        first, second = halves
        a = self.attn
        if linears is not None:
            w = linears.layers[layer]
            q, k, v = first(x, self.attn_norm.weight, self.attn_norm.eps, w.wqkv, a.wqkv.bias, *rope,
                            a.n_heads, a.n_kv_heads)
            return second(x, attend(q, k, v, mask, cache, layer, backend), w.wo, self.mlp_norm.weight,
                          self.mlp_norm.eps, w.gate_up, w.down)
        q, k, v = first(x, self.attn_norm.weight, self.attn_norm.eps, a.wqkv.weight, a.wqkv.bias, *rope,
                        a.n_heads, a.n_kv_heads)
        # The o-projection runs here, not in the second half: attention backends return different
        # memory layouts (and views or not), and a compiled half compiles again for each it is given.
        return second(x, a.out(attend(q, k, v, mask, cache, layer, backend)), self.mlp_norm.weight,
                      self.mlp_norm.eps, self.mlp.gate_up.weight, self.mlp.down.weight)


def block_halves(block_backend: str, device: torch.device, dtype: torch.dtype, cfg: ModelConfig):
    """(attention_inputs, block_output) as ``block_backend`` runs them. "compiled": torch.compile
    fuses each half's elementwise work (fp32 norm, RoPE, SiLU x up, residual adds) around its GEMMs,
    one compiled copy per device, dtype and model shape (pdllm.compiled says why); "eager": the
    functions themselves."""
    if block_backend == "auto":
        block_backend = "compiled" if device.type == "cuda" else "eager"
    if block_backend == "eager":
        return attention_inputs, block_output
    if block_backend != "compiled":
        raise ValueError(f"unknown block backend {block_backend!r}; choose one of {BLOCK_BACKENDS}")
    key = (device, dtype, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden, cfg.qkv_bias, cfg.norm_eps)
    return compiled(attention_inputs, key), compiled(block_output, key)


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
        linears: the blocks' matrices in FP8 (pdllm.fp8.Fp8Weights), for the scoring forward.
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
        """Blocks [start, stop) on the residual stream x (B, T, C) of tokens at positions pos (cascaded scoring)."""
        rope = self.rope(pos)
        halves = (block_halves(self.block_backend, x.device, x.dtype, self.cfg) if linears is None
                  else linears.halves(self.block_backend, x.device))
        for i in range(start, stop):
            x = self.blocks[i](x, rope, mask, cache, i, self.attention_backend, halves, linears)
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


__all__ = ["ModelConfig", "Transformer", "Block", "RMSNorm", "rope_cos_sin", "apply_rope", "build_random",
           "rms_norm", "attention_inputs", "block_output", "block_halves", "BLOCK_BACKENDS"]
