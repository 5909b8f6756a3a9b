"""The command line's surface: knobs (the settings a user can give, derived from the code, not
written out), and the one-line errors every pdllm command uses (``UsageError``, ``ArgumentParser``).

Every field of a config dataclass (GenerationConfig), every knob of a config that lists its own
(PrefillConfig: the pipeline's and every registered stage's), and every keyword of a registered
method's ``__init__`` is one knob, ``--chunk-size`` for ``chunk_size``; a bool is ``--x`` /
``--no-x``, ``none`` gives None to an optional knob. A knob's allowed values come from its field's
``choices`` metadata (or the config's ``knob_choices()``). ``pdllm generate`` and ``pdllm eval``
build their flags here, so a field added to a config, or a stage registered with its knobs, gets
its flag with no other change.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import typing
from dataclasses import dataclass
from typing import Any


class UsageError(Exception):
    """A problem with what the user asked for; the message names the flag or file and the fix."""


class ArgumentError(SystemExit):
    """A bad command line, already reported in one line by ArgumentParser.error (exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line `pdllm: error: ...` (no usage dump), then exit status 2."""

    def error(self, message):
        print(f"pdllm: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise ArgumentError(2)


@dataclass
class Knob:
    name: str  # the keyword (chunk_size); the flag is --chunk-size
    type: Any  # int, float, str or bool
    optional: bool  # None is allowed (given as `none`)
    default: Any
    choices: tuple | None = None  # the allowed values, where they are a list
    methods: list[str] = dataclasses.field(default_factory=list)  # the methods that take it (none: decoding)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _knob(name: str, hint, default, choices=None) -> Knob | None:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base not in (int, float, str, bool):
        return None  # not a command-line value (an object, a callable): set it from Python
    return Knob(name, base, optional, default, choices)


def config_knobs(cls) -> list[Knob]:
    """One knob per field of a config dataclass, or per knob of a config that lists its own
    (``knob_fields()`` -> (field, type hint) pairs, ``knob_choices()``)."""
    if hasattr(cls, "knob_fields"):
        pairs, choices = cls.knob_fields(), cls.knob_choices()
    else:
        hints = typing.get_type_hints(cls)
        pairs, choices = [(f, hints[f.name]) for f in dataclasses.fields(cls)], {}
    knobs = (_knob(f.name, hint, f.default, choices.get(f.name, f.metadata.get("choices"))) for f, hint in pairs)
    return [k for k in knobs if k is not None]


def method_knobs(cls) -> list[Knob]:
    """The knobs of a method class: its __init__ keywords, and the knobs of a config it takes."""
    hints = typing.get_type_hints(cls.__init__)
    knobs = []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        hint = hints.get(name)
        inner = [a for a in typing.get_args(hint) or [hint]
                 if dataclasses.is_dataclass(a) or hasattr(a, "knob_fields")]
        if inner:
            knobs += config_knobs(inner[0])
        elif (k := _knob(name, hint, param.default)) is not None:
            knobs.append(k)
    return knobs


def all_method_knobs(methods: dict) -> dict[str, Knob]:
    """Every method's knobs by name (``methods``: name -> class); a name two methods share is one flag."""
    knobs: dict[str, Knob] = {}
    for method, cls in methods.items():
        for k in method_knobs(cls):
            knobs.setdefault(k.name, k).methods.append(method)
    return knobs


def _value_parser(knob: Knob):
    def parse(text: str):
        if knob.optional and text.lower() == "none":
            return None
        value = knob.type(text)
        if knob.choices is not None and value not in knob.choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(str(c).lower() for c in knob.choices)})")
        return value
    parse.__name__ = knob.type.__name__  # argparse names the type in "invalid int value"
    return parse


def add_knob(group, knob: Knob, default=None):
    """--flag for a knob; left out, the attribute is absent (the config's or preset's default applies)."""
    shown = knob.default if default is None else default
    shown = "-" if shown is dataclasses.MISSING else shown
    where = f" [--method {', '.join(knob.methods)}]" if knob.methods else ""
    help_ = f"default: {str(shown).lower() if shown is None else shown}{where}"
    if knob.type is bool:
        group.add_argument(knob.flag, dest=knob.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_)
        return
    choices = knob.choices
    metavar = "{" + ",".join(str(c).lower() for c in choices) + "}" if choices else knob.type.__name__.upper()
    group.add_argument(knob.flag, dest=knob.name, type=_value_parser(knob), default=argparse.SUPPRESS,
                       metavar=metavar, help=help_)


def given_knobs(args, knobs) -> dict:
    """The knobs among ``knobs`` that the command line gave."""
    return {k.name: getattr(args, k.name) for k in knobs if hasattr(args, k.name)}
