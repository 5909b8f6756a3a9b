"""The GPU's ceilings that every benchmark reports against (the versions recorded with them are
pdllm.environment's).

A plain module (no pytest), so that the benchmark's conftest and the scripts beside it
(``ab_chunk_attention.py``, ``probe_*.py``) measure the copy rate the same way.
"""

from __future__ import annotations

import torch


def copy_gbps(n: int = 2**30) -> float:
    """Bytes read + written per second by an n-byte device-to-device copy (do_bench median)."""
    from triton.testing import do_bench

    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * n / (ms * 1e-3) / 1e9


def matmul_tflops(m: int = 8192) -> float:
    """bf16 matrix-product rate of an m x m x m product on random data (do_bench median)."""
    from triton.testing import do_bench

    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * m**3 / (ms * 1e-3) / 1e12


def graph_time_ms(fn, replays: int = 20, batches: int = 7) -> float:
    """Median GPU time of one fn() replayed from a CUDA graph (no launch path: the GPU's own time)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    del graph
    return sorted(times)[len(times) // 2]


def linear_weights(model, rows_with_head: bool = True):
    """The matrices a forward multiplies by, per layer (fused QKV, o, gate+up, down) then the head."""
    mats = [m for blk in model.blocks for m in (blk.attn.wqkv.weight, blk.attn.o.weight, blk.mlp.gate_up.weight,
                                                 blk.mlp.down.weight)]
    return mats + ([model.lm_head.weight] if rows_with_head else [])


def gemm_floor(model, rows: int, with_head: bool = True, copy: float | None = None) -> dict:
    """The forward's matrix work alone, for `rows` tokens: every linear layer's GEMM (the model's
    own weights, random activations), replayed from one CUDA graph. Returns its time, its rate and
    the time to read those weights once at the copy rate (the bandwidth floor): ``copy`` GB/s as
    the caller measured it in the same run, or measured now."""
    weights = linear_weights(model, with_head)
    inputs = {}
    for w in weights:  # one input per K (the layer's input width), shared
        inputs.setdefault(w.shape[1], torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device))

    def gemms():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    ms = graph_time_ms(gemms)
    flops = sum(2 * rows * w.numel() for w in weights)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    copy = copy_gbps() if copy is None else copy
    return {"rows": rows, "gemm_ms": ms, "gemm_tflops": flops / (ms * 1e-3) / 1e12, "linear_flops": flops,
            "weight_bytes": nbytes, "copy_gbps": copy, "weight_read_ms": nbytes / (copy * 1e9) * 1e3}
