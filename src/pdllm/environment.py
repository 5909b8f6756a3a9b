"""The machine a figure was measured on: device, driver and library versions, and the date.

Every result file (the tuner's config tables, the benchmarks' JSONs) records this dict, so that a
number always travels with the device and versions that produced it.
"""

from __future__ import annotations

import datetime
import platform
import subprocess

import torch


def nvidia_driver() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment() -> dict:
    """torch, triton, CUDA and Python versions, the date, and the first GPU's name, SM count,
    memory and driver (no GPU keys without a CUDA device)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # triton is Linux-only
        triton_version = None
    env = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
           "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), driver=nvidia_driver())
    return env
