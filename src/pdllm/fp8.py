"""FP8 (e4m3) linear layers for the scoring forward: the block's two halves with FP8 GEMMs.

Choosing the chunks runs every chunk through the model once (the scoring forward); at long
contexts that forward is most of a request, and its linear layers already run near the bf16 peak.
An H200 multiplies float8_e4m3fn about twice as fast as bf16, so this module gives the two block
halves of pdllm.model (``attention_inputs``, ``block_output``) an FP8 twin with the same arguments,
the four matrices given as ``Fp8Weight`` (quantized once, ``quantize_model``).

Design, and why:

* **Row-wise scales.** Every activation row (token) and every weight row (output feature) gets its
  own fp32 scale, amax / 448 (448 is e4m3's largest value): ``x @ w.T ~= (x8 @ w8.T) * sx * sw.T``,
  the scales applied to the fp32 accumulator by ``torch._scaled_mm``'s epilogue, so they cost no
  pass of their own. One scale per tensor would let one outlier token (a BOS/attention-sink row is
  often 10-100x the others) push every other token's values into e4m3's subnormals; per-row scales
  keep each row's relative error at e4m3's rounding (3 mantissa bits: at most 2^-4 per element,
  about 3-4% on a dot product of random signs), whatever the other rows hold.
* **Only the scoring forward.** Scoring ranks chunks; it needs the right top-K, not the last bit of
  every logit, and it is where the FLOPs are (every context token). The decode steps run few rows:
  their GEMMs are bound by reading the weights, where FP8 would save bandwidth but change the
  answer's tokens, so they stay bf16 (FP8 weights are an extra 1 byte/param next to the bf16 ones).
* **Attention stays bf16.** FP8 attention (FP8 Q, K and softmax probabilities) is known to lose
  long-context retrieval: a needle's logit is one of tens of thousands, and e4m3's relative error
  on q.k moves it by more than the gap to its neighbours. An FP8 linear layer's error is spread over
  a d_model-wide dot product and averages out; the scores (attention mass per chunk) are read from
  bf16 attention with fp32 accumulation exactly as before.
* **Quantization fused into its producer.** Quantizing an activation (row amax, scale, cast) is a
  reduction over each row plus a pass over the tensor; as separate eager ops it reads and writes the
  activation several times and costs more than FP8 saves (benchmarks/bench_fp8.py times that
  variant beside the others). Written as plain tensor functions below,
  torch.compile puts the row amax, the scale and the cast in the kernel that produces the
  activation (the RMSNorm before wqkv and gate_up, SiLU x up before down, the attention output's
  transpose before wo): one kernel per activation, which writes it in one byte per value instead
  of two, and an extern ``_scaled_mm`` call per GEMM. ``fp8_block_halves`` gives the compiled halves.

Shapes: ``torch._scaled_mm`` wants its first operand row-major (M, K) and its second column-major
(K, N), i.e. the (N, K) row-major weight transposed (``Fp8Weight.data.t()``), K and N multiples of
16 on CUDA, and on CUDA a bf16 output with row-wise scales: the FP8 halves run bf16 models on the
GPU (any float dtype on a CPU whose torch has row-wise scales there: ``supported``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdllm.model import BLOCK_BACKENDS, block_output, rms_norm, split_heads

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448.0
# A row whose largest magnitude is below this quantizes against it instead (an all-zero row, e.g.
# a zero weight row or a padded token, would otherwise divide by zero): its values then land in
# e4m3's subnormals or at zero, an absolute error below 1e-12 / 448 per value.
MIN_AMAX = 1e-12
# torch._scaled_mm's use_fast_accum: on Hopper, accumulating in the tensor cores' reduced-precision
# accumulator without promotions to fp32 registers: faster, and a larger error on q. Off until a
# measurement of selection agreement says otherwise (benchmarks/bench_fp8.py records both).
FAST_ACCUM = False


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (x8 (M, K) float8_e4m3fn, scale (M, 1) fp32) with x ~= x8 * scale row by row,
    M the product of the leading dims. Each row's largest magnitude maps to 448; the clamp keeps a
    value that rounds above 448 from becoming NaN (e4m3fn has no infinity)."""
    xf = x.reshape(-1, x.shape[-1]).float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX)
    x8 = (xf * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return x8, amax / E4M3_MAX


@dataclass
class Fp8Weight:
    """A linear layer's (N, K) matrix in e4m3 with one fp32 scale per output row.

    data:  float8_e4m3fn (N, K), row-major: ``data.t()`` is the column-major (K, N) operand that
           torch._scaled_mm wants second.
    scale: fp32 (1, N), so that w ~= data * scale.t() (scale_b of torch._scaled_mm).
    A bias stays the model's own bf16 parameter, passed beside the weight as in pdllm.model."""

    data: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.scale.t()).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


@torch.no_grad()
def quantize_weight(w: torch.Tensor) -> Fp8Weight:
    """Quantize a (N, K) weight row by row (one scale per output feature)."""
    data, scale = quantize_rows(w)
    return Fp8Weight(data, scale.reshape(1, -1))


@dataclass
class Fp8Layer:
    """One block's four matrices in FP8 (the norms and the qkv bias stay the model's)."""

    wqkv: Fp8Weight
    wo: Fp8Weight
    gate_up: Fp8Weight
    down: Fp8Weight


@dataclass
class Fp8Weights:
    """Every block's matrices in FP8, built once from a model (``quantize_model``); the bf16 weights
    stay for the decode, so FP8 scoring adds 1 byte per linear-layer parameter (about 7 GB for
    LLaDA-8B)."""

    layers: list[Fp8Layer]

    @staticmethod
    def halves(block_backend: str, device):
        """The block halves that take these weights (pdllm.model.Block.forward's ``linears``)."""
        return fp8_block_halves(block_backend, device)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for layer in self.layers for w in (layer.wqkv, layer.wo, layer.gate_up, layer.down))


@torch.no_grad()
def quantize_model(model) -> Fp8Weights:
    """The FP8 copy of a pdllm Transformer's linear layers, on the model's device."""
    return Fp8Weights([Fp8Layer(quantize_weight(b.attn.wqkv.weight), quantize_weight(b.attn.o.weight),
                                quantize_weight(b.mlp.gate_up.weight), quantize_weight(b.mlp.down.weight))
                       for b in model.blocks])


_QUANTIZED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_weights(model) -> Fp8Weights:
    """The model's FP8 copy, quantized once per model (the first FP8 scoring forward pays it)."""
    if model not in _QUANTIZED:
        if not supported(model.device):
            raise ValueError(f"FP8 scoring (score_fp8=True) needs torch._scaled_mm with row-wise scales, which this "
                             f"torch ({torch.__version__}) has not on {model.device}; set score_fp8=False")
        _QUANTIZED[model] = quantize_model(model)
    return _QUANTIZED[model]


_SUPPORTED: dict = {}


def supported(device) -> bool:
    """Whether torch._scaled_mm multiplies e4m3 with row-wise scales on this device: CUDA GPUs of
    compute capability 8.9+ (Ada, Hopper and later), CPUs where this torch's CPU kernel takes row-wise
    scales (2.13 does; 2.11's takes one scale per tensor). Tried once per device, on 16 x 16."""
    device = torch.device(device)
    if device not in _SUPPORTED:
        try:
            x8, scale = quantize_rows(torch.ones(16, 16, device=device))
            fp8_linear(x8, scale, x8, scale.t(), None, torch.bfloat16)
            _SUPPORTED[device] = True
        except (RuntimeError, NotImplementedError):
            _SUPPORTED[device] = False
    return _SUPPORTED[device]


# ---- fused activation quantization: each is the producer of an activation and its quantization in
# one function, which torch.compile turns into one kernel (the GEMM that reads the result is not) --


def rms_norm_fp8(x, weight, eps: float):
    """pdllm.model.rms_norm, quantized row by row: (x8 (M, C), scale (M, 1))."""
    return quantize_rows(rms_norm(x, weight, eps))


def silu_mul_fp8(gate_up):
    """The MLP's silu(gate) * up from the gate+up GEMM's output (M, 2F), in fp32, quantized."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return quantize_rows(F.silu(gate) * up)


def heads_fp8(y):
    """Attention's output (B, H, T, D) as the o-projection's input (B T, H D), quantized."""
    B, H, T, D = y.shape
    return quantize_rows(y.transpose(1, 2).reshape(B * T, H * D))


def fp8_linear(x8, x_scale, w8, w_scale, bias=None, out_dtype=torch.bfloat16):
    """(x8 * x_scale) @ (w8 * w_scale.t()).T + bias, accumulated in fp32, out in out_dtype; w8, w_scale
    an Fp8Weight's data and scale (tensors, so that compiled callers pass tensors only)."""
    return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=FAST_ACCUM)


def bf16_block_output(x, y, w_o, norm_weight, eps: float, w_gate_up, w_down):
    """pdllm.model's second half with the o-projection before it (Block.forward runs it between the
    halves), from attention's output y (B, H, T, D): fp8_block_output's bf16 twin, with its arguments
    (the tests and benchmarks compare the two)."""
    B, H, T, D = y.shape
    return block_output(x, F.linear(y.transpose(1, 2).reshape(B, T, H * D), w_o), norm_weight, eps, w_gate_up, w_down)


# ---- the two halves of a block, as pdllm.model's, with FP8 matrices -----------------------------
# The compiled functions take tensors only (the Fp8Weight fields): torch.compile then guards on
# tensor shapes and strides, never on which layer's Python objects were passed.


def _attention_inputs(x, norm_weight, eps: float, wqkv, wqkv_scale, b_qkv, cos, sin, n_heads: int, n_kv_heads: int):
    B, T, _ = x.shape
    x8, scale = rms_norm_fp8(x, norm_weight, eps)
    qkv = fp8_linear(x8, scale, wqkv, wqkv_scale, b_qkv, x.dtype)
    return split_heads(qkv.view(B, T, -1), cos, sin, n_heads, n_kv_heads)


def _block_output(x, y, wo, wo_scale, norm_weight, eps: float, w_gate_up, gate_up_scale, w_down, down_scale):
    y8, scale = heads_fp8(y)
    x = x + fp8_linear(y8, scale, wo, wo_scale, None, x.dtype).view_as(x)
    h8, scale = rms_norm_fp8(x, norm_weight, eps)
    gate_up = fp8_linear(h8, scale, w_gate_up, gate_up_scale, None, x.dtype)
    a8, scale = silu_mul_fp8(gate_up)
    return x + fp8_linear(a8, scale, w_down, down_scale, None, x.dtype).view_as(x)


def _halves(attention_fn, output_fn, dynamic: bool):
    """The public halves around the tensor-only functions: unpack the Fp8Weights, run without
    autograd (inference only: _scaled_mm has no derivative, and compiling a graph that asks for
    one fails) and, for compiled functions, mark the batch and token dims of x, cos, sin and y
    dynamic (the caller's tensors carry that mark on) so that the first compile serves every length.
    A batch of 1 is the one exception: torch.compile specializes sizes 0 and 1, so it compiles once more."""

    def mark(*tensor_dims):
        if dynamic:
            for t, d in tensor_dims:
                torch._dynamo.maybe_mark_dynamic(t, d)

    def fp8_attention_inputs(x, norm_weight, eps: float, w_qkv: Fp8Weight, b_qkv, cos, sin, n_heads: int,
                             n_kv_heads: int):
        """pdllm.model.attention_inputs with an FP8 QKV matrix: pre-norm fused with the activation's
        quantization, one FP8 GEMM (bias added in its epilogue), RoPE; q, k, v in x's dtype."""
        mark((x, 0), (x, 1), (cos, 0), (cos, 1), (sin, 0), (sin, 1))
        with torch.no_grad():
            return attention_fn(x, norm_weight, eps, w_qkv.data, w_qkv.scale, b_qkv, cos, sin, n_heads, n_kv_heads)

    def fp8_block_output(x, y, w_o: Fp8Weight, norm_weight, eps: float, w_gate_up: Fp8Weight, w_down: Fp8Weight):
        """pdllm.model.block_output with FP8 matrices: attention output quantized in its transpose,
        o-projection, residual add fused with the MLP's pre-norm and its quantization, gate+up,
        SiLU x up fused with its quantization, down, residual; returns x in its dtype."""
        mark((x, 0), (x, 1), (y, 0), (y, 2))
        with torch.no_grad():
            return output_fn(x, y, w_o.data, w_o.scale, norm_weight, eps, w_gate_up.data, w_gate_up.scale,
                             w_down.data, w_down.scale)

    return fp8_attention_inputs, fp8_block_output


fp8_attention_inputs, fp8_block_output = _halves(_attention_inputs, _block_output, dynamic=False)
_COMPILED: dict = {}


def compiled_halves():
    """(fp8_attention_inputs, fp8_block_output) compiled: one torch.compile each (fullgraph), dynamic
    in the batch and token dims. A failure to compile raises: FP8 scoring run eagerly would be
    slower than the compiled bf16 forward it replaces, so the caller should choose bf16 instead."""
    if "halves" not in _COMPILED:
        _COMPILED["halves"] = _halves(torch.compile(_attention_inputs, fullgraph=True),
                                      torch.compile(_block_output, fullgraph=True), dynamic=True)
    return _COMPILED["halves"]


def fp8_block_halves(block_backend: str, device: torch.device):
    """The FP8 halves for a block backend, as pdllm.model's bf16 ones: "compiled" (and "auto" on a
    GPU) fuses the quantization into its producers, "eager" (and "auto" elsewhere) runs the same
    math op by op (the reference, and the CPU path)."""
    if block_backend not in BLOCK_BACKENDS:
        raise ValueError(f"unknown block backend {block_backend!r}; choose one of {BLOCK_BACKENDS}")
    compiled = block_backend == "compiled" or (block_backend == "auto" and torch.device(device).type == "cuda")
    return compiled_halves() if compiled else (fp8_attention_inputs, fp8_block_output)


__all__ = ["E4M3", "E4M3_MAX", "Fp8Weight", "Fp8Layer", "Fp8Weights", "quantize_rows", "quantize_weight",
           "quantize_model", "model_weights", "bf16_block_output", "rms_norm_fp8", "silu_mul_fp8", "heads_fp8", "fp8_linear", "fp8_attention_inputs",
           "fp8_block_output", "compiled_halves", "fp8_block_halves", "supported"]
