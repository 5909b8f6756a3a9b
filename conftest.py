"""Repository-wide pytest set-up: benchmarks run only on request; ``gpu`` tests skip without CUDA.

``pytest``              runs the tests; tests that use pytest-benchmark's ``benchmark`` fixture
                        are skipped (pytest-benchmark's benchmark_skip), so CI stays fast.
``pytest --benchmark``  runs the benchmark suite only (pytest-benchmark's benchmark_only).

pytest-benchmark's own ``--benchmark-only`` / ``--benchmark-skip`` still work as usual. This file
imports nothing heavy (torch, not triton): tests/conftest.py must set TRITON_INTERPRET before
triton is imported.

Markers (pyproject.toml): ``gpu`` needs a CUDA device and is skipped without one; ``slow`` marks the
CPU tests that take more than a few seconds (``pytest -m "not slow"`` leaves them out).
"""

import pytest

from pdllm.testing import HAS_CUDA


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the benchmarks (benchmarks/bench_*.py) and nothing else; without it they are skipped",
    )


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options
def pytest_configure(config):
    opt = config.option
    if not hasattr(opt, "benchmark_only"):  # pytest-benchmark is not installed
        return
    if config.getoption("--benchmark"):
        opt.benchmark_only = True
        opt.benchmark_skip = False
    elif not opt.benchmark_only:
        opt.benchmark_skip = True


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
