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
