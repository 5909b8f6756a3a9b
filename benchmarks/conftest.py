"""Benchmark set-up: measure the GPU's two ceilings once, print a summary.

Run with ``pytest --benchmark`` (see the repository's conftest.py); plain ``pytest`` skips them.
pyproject's ``python_files`` collects bench_*.py. Without CUDA every benchmark is skipped (``gpu``). Triton and the kernels are imported lazily, inside
fixtures, so that this file never imports triton before tests/conftest.py sets TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ceilings import copy_gbps, matmul_tflops  # noqa: E402

from pdllm.environment import environment  # noqa: E402
from pdllm.testing import HAS_CUDA  # noqa: E402

if importlib.util.find_spec("pytest_benchmark") is None:  # nothing to run them with
    collect_ignore_glob = ["bench_*.py"]


# Filled by the benchmarks: {group: {impl: extra_info}}; printed at the end of the session.
RESULTS: dict[str, dict[str, dict]] = {}
CEILINGS: dict = {}
E2E_RESULTS: dict[str, dict] = {}  # {method: bench_e2e.run_one's row}


@pytest.fixture(scope="session")
def e2e_results():
    """{method: row} of the end-to-end benchmark, printed in the terminal summary."""
    return E2E_RESULTS


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
    if not CEILINGS:
        CEILINGS["copy_gbps"] = copy_gbps()
        CEILINGS["matmul_bf16_tflops"] = matmul_tflops()
        CEILINGS.update(environment())
        torch.cuda.empty_cache()
    return CEILINGS


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gpu"] = dict(CEILINGS) if CEILINGS else (environment() if HAS_CUDA else None)


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if E2E_RESULTS:
        tr.section("end to end, one request (8K context, 32 steps): the split of its time")
        tr.write_line(f"{'method':<20}{'total s':>9}{'scoring s':>11}{'refresh ms':>12}{'capture ms':>12}"
                      f"{'steady step ms':>16}{'sampler ms/step':>17}")
        for method, r in E2E_RESULTS.items():
            tr.write_line(f"{method:<20}{r['total_s']:>9.3f}{r['score_s']:>11.3f}{r['refresh_step_ms']:>12.1f}"
                          f"{r['capture_step_ms'] or 0:>12.1f}{r['steady_step_ms'] or 0:>16.2f}"
                          f"{r['sampler_ms_per_step']:>17.3f}")
        tr.write_line("steps timed by CUDA events on the GPU's timeline (no host sync); steady = median of steps 2+")
    if not RESULTS:
        return
    tr.section("chunk attention kernels")
    tr.write_line(
        f"{CEILINGS.get('device')}: copy {CEILINGS['copy_gbps']:.0f} GB/s (read+write), "
        f"bf16 matmul {CEILINGS['matmul_bf16_tflops']:.0f} TFLOP/s; torch {CEILINGS.get('torch')}, "
        f"triton {CEILINGS.get('triton')}, driver {CEILINGS.get('driver')}"
    )
    others = ["sdpa_gather", "flex", "sdpa_dense"]
    # GPU time: CUDA-graph replays of calls on rotating layers, no flush (the kernels' own time, what
    # a decode step replayed from a graph pays). Eager call: do_bench, one launch at a time, L2
    # flushed: below a few hundred us it times the host's launch path, not the kernel.
    tr.write_line(f"{'shape':<14}{'GPU us':>9}{'GB/s':>8}{'% copy':>8}{'eager-call us':>15}"
                  + "".join(f"{o + ' x':>15}" for o in others))
    for group, impls in RESULTS.items():
        ours = impls.get("pdllm")
        if ours is None:
            continue
        line = (f"{group:<14}{ours['time_us_rotating']:>9.1f}{ours['gbps_rotating']:>8.0f}"
                f"{ours['pct_copy_bw_rotating']:>8.1f}{ours['time_us']:>15.1f}")
        for o in others:
            line += f"{impls[o]['time_us_rotating'] / ours['time_us_rotating']:>15.2f}" if o in impls else f"{'-':>15}"
        tr.write_line(line)
    tr.write_line("GPU us: pdllm's time per call from CUDA-graph replays (pytest-benchmark's table above times the "
                  "same); eager-call us: one launch at a time, host launch path included")
    tr.write_line("'<impl> x': that implementation's GPU time over pdllm's (> 1: pdllm is faster)")
