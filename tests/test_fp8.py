"""pdllm.fp8: e4m3 quantization with row-wise scales, and the FP8 block halves against the model's.

Bounds, from e4m3's 3 mantissa bits: rounding to nearest moves a normal value by at most half a
unit in the last place, 2^-4 of it (2^-10 of the row's scale in the subnormals). A GEMM of two
quantized operands sees each product a_i w_i with a relative error of about sqrt(2) x 0.026
(0.026: the rms of a uniform rounding error over a binade, relative to the value); summed over K
terms of random sign, the output's relative (Frobenius) error stays at that per-term figure,
about 0.037, whatever K: measured 0.031-0.037 for q, k, v here and at LLaDA-8B's shape on the GPU.
The block's update (output - x) adds the MLP's chain: gate and up errors meet in silu(gate) x up,
which is rounded again, as is the down weight: about sqrt(2 x 0.037^2 + 2 x 0.026^2) = 0.065 where
the MLP dominates the update (0.069-0.070 measured at LLaDA-8B's shape, benchmarks/bench_fp8.py),
less where the o-projection weighs in (0.037-0.039 on the tiny shapes here). The bounds (0.05 for
one GEMM, 0.08 for the block's update) sit above those with margin and far below what a wrong
scale, a transposed operand or a lost row would give (>= 1).
"""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pdllm import fp8
from pdllm.fp8 import (E4M3, E4M3_MAX, compiled_halves, fp8_attention_inputs, fp8_block_halves, fp8_block_output,
                       fp8_linear, quantize_model, quantize_rows, quantize_weight, supported)
from pdllm.fp8 import bf16_block_output
from pdllm.model import ModelConfig, attention_inputs, build_random
from pdllm.testing import HAS_CUDA

ONE_GEMM_BOUND, BLOCK_BOUND = 0.05, 0.08
# Tiny shapes of the two architectures (dims multiples of 16, as _scaled_mm needs on CUDA).
LLADA = ModelConfig(vocab_size=64, d_model=256, n_layers=1, n_heads=4, n_kv_heads=4, mlp_hidden=512, mask_id=1,
                    bos_id=2, eos_id=3)
DREAM = replace(LLADA, arch="dream", n_heads=8, n_kv_heads=2, mlp_hidden=640, qkv_bias=True, norm_eps=1e-6,
                rope_theta=1e6)
SHAPES = {"llada": LLADA, "dream": DREAM}
# The eager FP8 path on a CPU needs torch._scaled_mm with row-wise scales there (torch 2.13 has it,
# 2.11 does not): where it is missing, the GPU tests below check the same arithmetic on CUDA.
cpu_scaled_mm = pytest.mark.skipif(not supported("cpu"),
                                   reason="this torch's CPU _scaled_mm takes per-tensor scales only")


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def tiny_block(cfg: ModelConfig, dtype, device="cpu", seed: int = 0):
    """One block of random weights (LLaDA's init, N(0, 0.02)); norms and the qkv bias made non-trivial."""
    model = build_random(cfg, dtype, device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        blk = model.blocks[0]
        for norm in (blk.attn_norm, blk.mlp_norm):
            norm.weight.add_(0.1 * torch.randn(norm.weight.shape, generator=g, device=device).to(dtype))
        if blk.attn.wqkv.bias is not None:
            blk.attn.wqkv.bias.normal_(0.0, 0.1, generator=g)
    return model


def block_inputs(model, B: int, T: int, seed: int, outlier: float = 50.0):
    """x (B, T, C) with one outlier token (a BOS/attention-sink row is often far larger than the
    rest), RoPE tables for positions 0..T-1, attention output y (B, H, T, D)."""
    cfg, device, dtype = model.cfg, model.device, model.dtype
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, T, cfg.d_model, generator=g, device=device)
    x[0, 0] *= outlier
    y = torch.randn(B, cfg.n_heads, T, cfg.head_dim, generator=g, device=device)
    cos, sin = model.rope(torch.arange(T, device=device).expand(B, T))
    return x.to(dtype), cos, sin, y.to(dtype)


def run_halves(model, weights, halves, x, cos, sin, y):
    """(q, k, v), x_out of block 0 through (first, second) halves; weights: the model's tensors or
    the Fp8Layer that replaces them (the signatures mirror each other)."""
    first, second = halves
    blk, a = model.blocks[0], model.blocks[0].attn
    w = weights or blk
    wqkv, wo, gate_up, down = ((a.wqkv.weight, a.o.weight, blk.mlp.gate_up.weight, blk.mlp.down.weight)
                               if weights is None else (w.wqkv, w.wo, w.gate_up, w.down))
    qkv = first(x, blk.attn_norm.weight, blk.attn_norm.eps, wqkv, a.wqkv.bias, cos, sin, a.n_heads, a.n_kv_heads)
    out = second(x, y, wo, blk.mlp_norm.weight, blk.mlp_norm.eps, gate_up, down)
    return qkv, out


# ---- quantization ---------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 9), cols=st.sampled_from([16, 48, 256]),
       log_scale=st.floats(-6, 6))
def test_quantize_round_trip_is_within_e4m3_rounding(seed, rows, cols, log_scale):
    g = torch.Generator().manual_seed(seed)
    # Each row its own magnitude, spread over 10^+-3 around 10^log_scale: the per-row scales must absorb it.
    magnitude = 10 ** (log_scale + 3 * (2 * torch.rand(rows, 1, generator=g) - 1))
    x = torch.randn(rows, cols, generator=g) * magnitude
    x8, scale = quantize_rows(x)
    assert x8.dtype == E4M3 and x8.shape == (rows, cols) and scale.shape == (rows, 1) and scale.dtype == torch.float32
    back = x8.float() * scale
    assert back.isfinite().all() and x8.float().abs().max() <= E4M3_MAX
    # Half a unit in the last place: 2^-4 of the value in e4m3's normal range, 2^-10 of the scale below it.
    assert ((back - x).abs() <= 2**-4 * x.abs() + 2**-10 * scale).all()
    # The row's largest magnitude is the top of e4m3's range: 448 exactly, so no code is wasted.
    assert torch.equal(x8.float().abs().amax(dim=1), torch.full((rows,), E4M3_MAX))


def test_a_row_is_quantized_by_its_own_values_alone():
    """Row-wise scales: one token 10^4 times larger changes nothing in the other rows' codes or
    scales (a per-tensor scale would push them into e4m3's subnormals)."""
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    loud = x.clone()
    loud[2] *= 1e4
    (a, sa), (b, sb) = quantize_rows(x), quantize_rows(loud)
    keep = torch.arange(6) != 2
    assert torch.equal(a[keep].view(torch.uint8), b[keep].view(torch.uint8)) and torch.equal(sa[keep], sb[keep])


ON_EACH_DEVICE = pytest.mark.parametrize("device", [pytest.param("cpu", marks=cpu_scaled_mm),
                                                    pytest.param("cuda", marks=pytest.mark.gpu)])


@ON_EACH_DEVICE
def test_zero_rows_quantize_to_zero_with_a_finite_scale(device):
    w = torch.randn(32, 64, dtype=torch.bfloat16, device=device)
    w[[0, 17]] = 0
    q = quantize_weight(w)
    assert q.data.shape == (32, 64) and q.scale.shape == (1, 32) and q.scale.isfinite().all() and (q.scale > 0).all()
    assert (q.data[[0, 17]].float() == 0).all() and q.dequantize().isfinite().all()
    x = torch.randn(5, 64, dtype=torch.bfloat16, device=device)
    x[3] = 0  # a token whose activation is all zero (its norm's output is zero too)
    x8, sx = quantize_rows(x)
    bias = torch.randn(32, dtype=torch.bfloat16, device=device)
    out = fp8_linear(x8, sx, q.data, q.scale, bias, torch.bfloat16)
    assert out.isfinite().all()
    assert torch.equal(out[3], bias) and torch.equal(out[:, 0], bias[0].expand(5))  # 0 + bias, exactly


def test_quantize_model_has_every_layers_matrices_at_one_byte_a_value():
    model = build_random(replace(DREAM, n_layers=2), torch.bfloat16, "cpu")
    weights = quantize_model(model)
    assert len(weights.layers) == 2
    for blk, layer in zip(model.blocks, weights.layers):
        for w, q in ((blk.attn.wqkv.weight, layer.wqkv), (blk.attn.o.weight, layer.wo),
                     (blk.mlp.gate_up.weight, layer.gate_up), (blk.mlp.down.weight, layer.down)):
            assert q.data.shape == w.shape and q.data.dtype == E4M3 and q.scale.shape == (1, w.shape[0])
            assert relative_error(q.dequantize(), w) < 0.03  # one operand alone: about half the GEMM's error
    linear = sum(w.numel() for blk in model.blocks for w in (blk.attn.wqkv.weight, blk.attn.o.weight,
                                                             blk.mlp.gate_up.weight, blk.mlp.down.weight))
    scales = sum(q.scale.numel() * 4 for layer in weights.layers
                 for q in (layer.wqkv, layer.wo, layer.gate_up, layer.down))
    assert weights.nbytes == linear + scales


# ---- the FP8 halves against the model's -------------------------------------------------------


@cpu_scaled_mm
@pytest.mark.parametrize("arch", ["llada", "dream"])
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), T=st.integers(1, 40))
def test_fp8_halves_are_within_e4m3_error_of_the_fp32_halves(arch, seed, B, T):
    """In fp32 (the CPU's _scaled_mm returns fp32), so that the error measured is FP8's alone. The
    block's output is compared as its update (out - x): the residual would hide the error."""
    model = tiny_block(SHAPES[arch], torch.float32, seed=seed % 7)
    x, cos, sin, y = block_inputs(model, B, T, seed)
    (q, k, v), out = run_halves(model, None, (attention_inputs, bf16_block_output), x, cos, sin, y)
    (q8, k8, v8), out8 = run_halves(model, quantize_model(model).layers[0], (fp8_attention_inputs, fp8_block_output),
                                    x, cos, sin, y)
    for actual, expected in ((q8, q), (k8, k), (v8, v)):
        assert actual.shape == expected.shape and actual.dtype == torch.float32
        assert relative_error(actual, expected) <= ONE_GEMM_BOUND
    assert out8.shape == out.shape and relative_error(out8 - x, out - x) <= BLOCK_BOUND


@ON_EACH_DEVICE
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_fp8_halves_in_bf16_return_bf16_without_nan(arch, device):
    """The model dtype of the GPU path: bf16 out of _scaled_mm, bias in bf16. Against the fp32 halves
    of the same (bf16-valued) weights, FP8 adds its own error to bf16's rounding of the outputs."""
    model = tiny_block(SHAPES[arch], torch.bfloat16, device, seed=3)
    x, cos, sin, y = block_inputs(model, 2, 33, seed=5)
    fp8_layer = quantize_model(model).layers[0]
    (q8, k8, v8), out8 = run_halves(model, fp8_layer, (fp8_attention_inputs, fp8_block_output), x, cos, sin, y)
    reference = model.float()
    (q, k, v), out = run_halves(reference, None, (attention_inputs, bf16_block_output), x.float(), cos, sin, y.float())
    for actual, expected in ((q8, q), (k8, k), (v8, v)):
        assert actual.dtype == torch.bfloat16 and actual.isfinite().all()
        assert relative_error(actual, expected) <= ONE_GEMM_BOUND
    assert out8.dtype == torch.bfloat16 and out8.isfinite().all()
    assert relative_error(out8, out) <= 0.01  # the residual dominates the output: FP8 moves it by ~x's rounding


def test_block_backends_choose_eager_or_compiled():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fp8_block_halves("auto", cpu) == fp8_block_halves("eager", cuda) == (fp8_attention_inputs, fp8_block_output)
    with pytest.raises(ValueError, match="unknown block backend 'fused'"):
        fp8_block_halves("fused", cpu)


@cpu_scaled_mm
def test_benchmark_smoke_run_writes_its_json(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fp8.py"
    spec = importlib.util.spec_from_file_location("bench_fp8", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "fp8.json"
    bench.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["smoke"] and report["environment"]["torch"] == torch.__version__
    for row in report["rows"]:
        assert set(bench.VARIANTS) <= set(row["ms"]) and all(v > 0 for v in row["ms"].values())
        assert row["fp8_halves_over_bf16_halves"] > 0 and row["fp8_halves_linear_tflops"] > 0
        assert row["error_vs_fp32"]["fp8_halves"]["q"] <= ONE_GEMM_BOUND


# ---- GPU: the compiled halves, the fused kernels ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_compiled_fp8_halves_equal_the_eager_ones_at_every_length_without_recompiling(arch):
    model = tiny_block(SHAPES[arch], torch.bfloat16, "cuda", seed=1)
    layer = quantize_model(model).layers[0]
    reference = tiny_block(SHAPES[arch], torch.float32, "cuda", seed=1)
    compiled = compiled_halves()
    run_halves(model, layer, compiled, *block_inputs(model, 2, 17, seed=0))  # the one compile (B > 1)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new length or batch must reuse it
        for B, T in ((2, 40), (3, 129), (4, 1000)):
            x, cos, sin, y = block_inputs(model, B, T, seed=T)
            (q, k, v), out = run_halves(model, layer, compiled, x, cos, sin, y)
            (qe, ke, ve), oute = run_halves(model, layer, (fp8_attention_inputs, fp8_block_output), x, cos, sin, y)
            (qr, kr, vr), outr = run_halves(reference, None, (attention_inputs, bf16_block_output), x.float(), cos, sin,
                                            y.float())
            # Compiled and eager round the norm's output differently (fp32 in registers vs bf16), so
            # a few values land on the neighbouring e4m3 code: within a third of FP8's own error.
            for actual, eager, exact in ((q, qe, qr), (k, ke, kr), (v, ve, vr)):
                assert actual.dtype == torch.bfloat16 and relative_error(actual, eager) <= 0.02
                assert relative_error(actual, exact) <= ONE_GEMM_BOUND
            # The update: compiled, x + o + down is rounded to bf16 once; eagerly, twice. On the outlier
            # row (x 50) that rounding is a good part of the update, so it is held to FP8's own bound.
            assert relative_error(out - x, oute - x) <= ONE_GEMM_BOUND and relative_error(out, oute) <= 0.01
            assert relative_error(out - x, outr - x.float()) <= BLOCK_BOUND and out.isfinite().all()


def _kernels(code: str) -> list[str]:
    """The Triton kernels' sources in one of inductor's output files."""
    return [part.split("''', device_str")[0] for part in code.split("async_compile.triton(")[1:]]


@pytest.mark.gpu
def test_inductor_fuses_the_quantization_into_its_producers_and_calls_scaled_mm():
    from torch._inductor.utils import run_and_get_code

    model = tiny_block(DREAM, torch.bfloat16, "cuda", seed=2)
    layer = quantize_model(model).layers[0]
    x, cos, sin, y = block_inputs(model, 2, 64, seed=0)
    torch._dynamo.reset()  # compile now, so that the code is generated (and seen) in this test
    fp8._COMPILED.clear()
    first, second = compiled_halves()
    blk = model.blocks[0]
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, (code_first,) = run_and_get_code(first, x, blk.attn_norm.weight, blk.attn_norm.eps, layer.wqkv,
                                            blk.attn.wqkv.bias, cos, sin, DREAM.n_heads, DREAM.n_kv_heads)
        _, (code_second,) = run_and_get_code(second, x, y, layer.wo, blk.mlp_norm.weight, blk.mlp_norm.eps,
                                             layer.gate_up, layer.down)
    assert code_first.count("extern_kernels._scaled_mm(") == 1 and code_second.count("extern_kernels._scaled_mm(") == 3
    for code, producers in ((code_first, ["rsqrt"]), (code_second, ["rsqrt", "exp("])):
        kernels = _kernels(code)
        quantizing = [k for k in kernels if "float8e4nv" in k]
        # No kernel computes a row's amax without also writing its e4m3 values (the unfused form
        # reads the activation once for the amax and again to scale and cast it).
        assert all("float8e4nv" in k for k in kernels if "max2" in k or "maximum" in k), code
        for producer in producers:  # the norm (rsqrt) and SiLU (x / (1 + exp(-x))) are in the quantizing kernels
            assert any(producer in k for k in quantizing), code
