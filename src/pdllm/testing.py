"""One tolerance table and one ``assert_close`` for every numerical test in pdllm, HAS_CUDA
(whether this machine runs the GPU-only tests and benchmarks, ``@pytest.mark.gpu``), the
Hypothesis profile the tests run with, and StepRecorder, a sampler method that records what
another one computes.

Tolerances are per dtype of the tensors being compared: fp32 paths accumulate in fp32 and agree
to rounding; fp16/bf16 paths differ from the fp32 reference by their storage precision.
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
# tests/conftest.py registers the profiles: `ci` (interpreter), `gpu` (native, few examples), `thorough`.
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "gpu" if HAS_CUDA else "ci")

TOLERANCES = {  # dtype: (atol, rtol)
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = ""):
    """Compare in fp32 with the tolerance of ``dtype`` (default: the lower precision of the two)."""
    if dtype is None:
        dtype = max(actual.dtype, expected.dtype, key=lambda d: TOLERANCES[d][0])
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=False, msg=msg or None)


def random_prompts(vocab: int, lengths=(13, 7, 10), seed: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths, clear of the special ids at both ends of a tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 20, (n,), generator=g).tolist() for n in lengths]


class StepRecorder:
    """A sampler method that runs another and keeps, for every step, (the block's tokens before the
    step, the block's logits). Both are copies: a CUDA-graph step overwrites its output at the
    next replay."""

    def __init__(self, method):
        self.method, self.name, self.supports_cfg = method, method.name, method.supports_cfg
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def stats(self) -> dict:
        return self.method.stats

    @property
    def logits(self) -> list[torch.Tensor]:
        return [logits for _, logits in self.steps]

    def begin(self, model, batch):
        self.method.begin(model, batch)

    def block_logits(self, model, x, start, end, step):
        out = self.method.block_logits(model, x, start, end, step)
        self.steps.append((x[:, start:end].clone(), out.clone()))
        return out
