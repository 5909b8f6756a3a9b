"""Registries: name -> class, the one way a decoding method or a selection stage plugs in.

A class registers itself where it is defined (``@METHODS.register``, ``@SCORERS.register``), so the
code that looks a name up never imports the modules that implement it: the sampler resolves
``method="prefill"`` without importing prefill, and the selection pipeline runs a scorer that a
fork defined in a file of its own. ``pdllm/__init__.py`` imports the built-in ones.
"""

from __future__ import annotations


class Registry(dict):
    """``name -> class`` for one kind of plug-in; a class names itself with a ``name`` attribute."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # for messages: "method", "scorer", ...

    def register(self, cls):
        """Class decorator: make ``cls`` available under ``cls.name``."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} class needs a `name` string attribute to be registered ({cls!r})")
        if self.get(name, cls) is not cls:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self[name].__qualname__}); "
                             "pick another name, or unregister the old one first")
        self[name] = cls
        return cls

    def unregister(self, name: str):
        self.pop(name, None)

    def lookup(self, name: str):
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self)}")
        return self[name]
