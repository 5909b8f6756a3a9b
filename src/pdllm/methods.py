"""The decoding methods by name: the one place a method is registered.

A method is a small strategy object for the sampler (``begin`` once, ``block_logits`` per step;
see pdllm.sampler). This module sits above the sampler and every method module: it imports them
all, and ``generate(..., method="name")`` resolves the name here. The sampler itself imports no
method module, so there is no sampler -> prefill -> sampler circle.

To add a method: write a class with ``name``, ``supports_cfg``, ``stats``, ``begin`` and
``block_logits``, and add it to METHODS.
"""

from __future__ import annotations

from pdllm.baselines.dllm_cache import DllmCache
from pdllm.baselines.dyllm import DyLLM
from pdllm.prefill import Prefill
from pdllm.sampler import DualCache, PrefixCache, Vanilla

METHODS = {cls.name: cls for cls in (Vanilla, PrefixCache, DualCache, Prefill, DllmCache, DyLLM)}


def make_method(method, **kwargs):
    """A method object from its name and knobs (a method object is returned as it is)."""
    if not isinstance(method, str):
        if kwargs:
            raise ValueError(f"method knobs {sorted(kwargs)} go with a method name, not a method object")
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](**kwargs)
