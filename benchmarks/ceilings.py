"""The GPU's ceilings that every benchmark reports against, and the versions recorded with them.

A plain module (no pytest), so that the benchmark's conftest and the scripts beside it
(``ab_chunk_attention.py``, ``probe_*.py``) measure the copy rate the same way.
"""

from __future__ import annotations

import subprocess

import torch

HAS_CUDA = torch.cuda.is_available()


def gpu_info() -> dict:
    """Device, driver and library versions, recorded with every result."""
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    return info


def copy_gbps(n: int = 2**30) -> float:
    """Bytes read + written per second by an n-byte device-to-device copy (do_bench median)."""
    from triton.testing import do_bench

    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * n / (ms * 1e-3) / 1e9
