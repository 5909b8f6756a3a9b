"""The decoding methods by name: the registry ``generate(..., method="name")`` resolves names in.

A method is a small strategy object for the sampler (``begin`` once, ``block_logits`` per step;
see pdllm.sampler). Each method class registers itself where it is defined
(``@METHODS.register``): the sampler's own (vanilla, prefix, dual), pdllm.prefill's, the
baselines'. This module imports none of them, so the sampler can look names up here without an
import circle; ``pdllm/__init__.py`` imports the built-in method modules.

To add a method: write a class with ``name``, ``supports_cfg``, ``stats``, ``begin`` and
``block_logits``, and decorate it with ``@METHODS.register``.
"""

from __future__ import annotations

from pdllm.registry import Registry

METHODS = Registry("method")


def make_method(method, **kwargs):
    """A method object from its name and knobs (a method object is returned as it is)."""
    if not isinstance(method, str):
        if kwargs:
            raise ValueError(f"method knobs {sorted(kwargs)} go with a method name, not a method object")
        return method
    return METHODS.lookup(method)(**kwargs)
