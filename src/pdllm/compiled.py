"""torch.compile with an eager fallback, one compiled copy per key.

pdllm compiles the transformer block's two halves (pdllm.model's attention_inputs and
block_output) when a model's block_backend is "compiled", the default on a GPU. Two rules:

* Dynamo keeps a function's graphs on its code object and compiles at most
  ``torch._dynamo.config.recompile_limit`` (8) of them; with fullgraph=True the next new input
  signature raises FailOnRecompileLimitHit. One model needs a few graphs (batch 1 and batch > 1
  are specialised apart; a length, then any length), and a process that runs several models or
  dtypes (the test suite, an eval of two checkpoints) needs those again for each. So each key
  (the model's device, dtype and sizes: see pdllm.model.block_halves) compiles its own copy of the
  function, a code object of its own with a budget of its own.
* Compiling must never fail an answer: where it fails (no C compiler, a backend error, a limit
  hit all the same), that copy runs eagerly from then on, after one warning.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch

from pdllm.notices import PdllmWarning


class CompiledOrEager:
    """``fn`` through ``torch.compile(fullgraph=True)``; ``fn`` itself once compiling has failed."""

    def __init__(self, fn):
        self.fn = fn
        own_code = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                      fn.__closure__)
        self.compiled = torch.compile(own_code, fullgraph=True)
        self.error: Exception | None = None  # why compiling failed; None while the compiled code runs

    def __call__(self, *args):
        if self.error is not None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except Exception as e:  # a compiler missing or failing must not fail the answer
            out = self.fn(*args)  # raises again if the inputs, not the compiler, were the problem
            self.error = e
            first_line = str(e).splitlines()[0] if str(e) else ""
            warnings.warn(f"pdllm: torch.compile of {self.fn.__name__} failed ({type(e).__name__}: {first_line}); "
                          "running it eagerly", PdllmWarning, stacklevel=3)
            return out


@functools.cache
def compiled(fn, key) -> CompiledOrEager:
    """The process's one compiled copy of ``fn`` for ``key`` (hashable: what its graphs are specialised on)."""
    return CompiledOrEager(fn)
