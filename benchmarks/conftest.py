"""Benchmark set-up: collect bench_*.py, measure the GPU's two ceilings once, print a summary.

Run with ``pytest --benchmark`` (see the repository's conftest.py); plain ``pytest`` skips them.
Without CUDA every benchmark is skipped. Triton and the kernels are imported lazily, inside
fixtures, so that this file never imports triton before tests/conftest.py sets TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ceilings import copy_gbps  # noqa: E402

from pdllm.environment import environment  # noqa: E402
from pdllm.testing import HAS_CUDA  # noqa: E402

if importlib.util.find_spec("pytest_benchmark") is None:  # nothing to run them with
    collect_ignore_glob = ["bench_*.py"]


# Filled by the benchmarks: {group: {impl: extra_info}}; printed at the end of the session.
RESULTS: dict[str, dict[str, dict]] = {}
CEILINGS: dict = {}


@pytest.fixture(scope="session")
def bench_results():
    """{group: {impl: extra_info}}, filled by the benchmarks, printed in the terminal summary."""
    return RESULTS


@pytest.fixture(scope="session")
def gpu_ceilings():
    """Copy bandwidth (bytes read + written by a 1 GiB device-to-device copy) and bf16 matmul
    TFLOP/s (8192^3 on random data), each the median of triton.testing.do_bench."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    from triton.testing import do_bench

    if not CEILINGS:
        CEILINGS["copy_gbps"] = copy_gbps()
        m = 8192
        a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
        ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
        CEILINGS["matmul_bf16_tflops"] = 2 * m**3 / (ms * 1e-3) / 1e12
        del a, b
        CEILINGS.update(environment())
        torch.cuda.empty_cache()
    return CEILINGS


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gpu"] = dict(CEILINGS) if CEILINGS else (environment() if HAS_CUDA else None)


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("chunk attention kernels")
    tr.write_line(
        f"{CEILINGS.get('device')}: copy {CEILINGS['copy_gbps']:.0f} GB/s (read+write), "
        f"bf16 matmul {CEILINGS['matmul_bf16_tflops']:.0f} TFLOP/s; torch {CEILINGS.get('torch')}, "
        f"triton {CEILINGS.get('triton')}, driver {CEILINGS.get('driver')}"
    )
    others = ["sdpa_gather", "flex", "sdpa_dense"]
    # The CUDA-graph timing first: it is the kernels' own time. do_bench launches one call at a
    # time, so below a few hundred us it also counts the host's launch path (and the L2 flush's
    # write-backs): read it as the time of an eager call, not of the kernel.
    for key, label in (("time_us_rotating", "CUDA graph, rotating layers, no flush (kernel time)"),
                       ("time_us", "do_bench, one launch at a time, L2 flushed (eager call: host launch path included)")):
        pct = "pct_copy_bw" if key == "time_us" else "pct_copy_bw_rotating"
        gb = "gbps" if key == "time_us" else "gbps_rotating"
        tr.write_line(f"-- timing: {label}")
        tr.write_line(f"{'shape':<14}{'pdllm us':>10}{'GB/s':>8}{'% copy':>8}" + "".join(f"{o + ' x':>15}" for o in others))
        for group, impls in RESULTS.items():
            ours = impls.get("pdllm")
            if ours is None:
                continue
            line = f"{group:<14}{ours[key]:>10.1f}{ours[gb]:>8.0f}{ours[pct]:>8.1f}"
            for o in others:
                line += f"{impls[o][key] / ours[key]:>15.2f}" if o in impls else f"{'-':>15}"
            tr.write_line(line)
    tr.write_line("'<impl> x': that implementation's time over pdllm's (> 1: pdllm is faster)")
