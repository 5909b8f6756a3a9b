"""Shared test set-up.

Triton kernels run through the interpreter when there is no GPU: TRITON_INTERPRET must be set
before triton is first imported, which is why it happens here, at the top of the first conftest.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# `ci`: interpreter on CPU, small shapes, fp32/fp16, a few minutes in all.
# `gpu`: native kernels, thousands of cases. Pick with HYPOTHESIS_PROFILE=gpu (the default on CUDA).
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "gpu", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if HAS_CUDA else "ci"))

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
