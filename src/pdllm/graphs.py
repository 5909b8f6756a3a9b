"""CUDA graphs for decode steps, kept plain (gpt-fast style).

Within a block every step runs the same forward on the same shapes, only the token values change,
so the step can be captured once and replayed: a step then costs its GPU time instead of the
Python and launch overhead of ~1000 small kernels. The capture (one warm-up run plus the
recording) is paid at the second step of each block and counted in every timing we report.
"""

from __future__ import annotations

import warnings

import torch

from pdllm.notices import PdllmWarning


def capture(fn, idx: torch.Tensor, key):
    """A StepGraph, or None (with one warning) where this forward cannot be captured: the caller
    then runs it eagerly, slower but the same."""
    try:
        return StepGraph(fn, idx, key)
    except Exception as e:  # capture can fail on drivers/versions we have not seen; never fail the answer
        global _warned
        if not _warned:
            warnings.warn(f"pdllm: CUDA-graph capture of the decode step failed ({e!r}); running eagerly",
                          PdllmWarning, stacklevel=2)
            _warned = True
        torch.cuda.synchronize()
        return None


_warned = False


class StepGraph:
    """``fn(idx) -> logits`` captured for one input shape; ``graph(idx)`` replays it.

    ``fn`` must read everything else (positions, caches, index tables) from tensors whose storage
    stays put while the graph is used (the graph holds ``fn``, so what its closure captures stays
    alive); the returned logits tensor is overwritten by the next replay.
    """

    def __init__(self, fn, idx: torch.Tensor, key):
        # Keep fn, and with it every tensor its closure holds (positions, write rows...): the graph
        # reads their memory at each replay, and a freed tensor's memory is soon reused by others.
        self.fn, self.key, self.idx = fn, key, idx.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: Triton compiles, cuBLAS picks kernels
            fn(self.idx)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.idx)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.idx.copy_(idx)
        self.graph.replay()
        return self.out


def graphs_available(device: torch.device) -> bool:
    return device.type == "cuda"
