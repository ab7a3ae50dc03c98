"""Command-line flags derived from a config dataclass: the one way tuna's own CLIs expose a config.

Each field becomes ``--kebab-case-name`` with the field's type and default; its help is the field's
entry in the class docstring's ``Attributes:`` section (Google style; ``a, b: text`` and
``a: text; b: text`` entries are split per field), so a config documents its flags once. ``train/train.py``
is the exception: it follows HF's ``TrainingArguments`` and so parses with ``HfArgumentParser``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any, Iterable

_SCALARS = (int, float, str)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps a description's and epilog's line breaks (examples, file layouts) and shows every default."""


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the docstring's ``Attributes:`` section (empty for undocumented ones)."""
    doc = cls.__doc__ or ""
    names = {f.name for f in dataclasses.fields(cls)}
    section = re.split(r"^\s*Attributes:\s*$", doc, maxsplit=1, flags=re.M)
    if len(section) < 2:
        return {}
    entries: list[list[str]] = []  # each: [names..., text]
    entry_re = re.compile(r"^\s{4,8}((?:\w+)(?:,\s*\w+)*):\s*(.*)$")
    for line in section[1].splitlines():
        match = entry_re.match(line)
        if match and all(n.strip() in names for n in match.group(1).split(",")):
            entries.append([*(n.strip() for n in match.group(1).split(",")), match.group(2)])
        elif entries and line.strip():
            entries[-1][-1] += " " + line.strip()
    docs: dict[str, str] = {}
    for *fields, text in entries:
        # "steps: optimiser steps; batch_size: pairs per step" documents two fields in one entry
        parts = re.split(rf";\s*(?=(?:{'|'.join(map(re.escape, names))}):)", text)
        docs.update({name: parts[0].strip() for name in fields})
        for part in parts[1:]:
            name, _, rest = part.partition(":")
            docs[name.strip()] = rest.strip()
    return {name: text.replace("``", "") for name, text in docs.items()}  # reST literals read as plain text


def _flag_type(hint: Any, where: str) -> tuple[Any, bool]:
    """(argparse ``type``, is a sequence) for a field's type hint; raises TypeError for unsupported ones."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _flag_type(inner[0], where)
    if origin in (tuple, list) and args and args[0] in _SCALARS:
        return args[0], True
    if hint in _SCALARS:
        return hint, False
    raise TypeError(f"{where}: no command-line flag for type {hint!r} (skip the field)")


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                     skip: Iterable[str] = (), names: dict[str, str] | None = None,
                     helps: dict[str, str] | None = None, required: Iterable[str] = (),
                     defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per field of dataclass ``cls`` (in field order) to ``parser``.

    Args:
        skip: fields without a flag (the caller fills them, or they keep their default).
        names: field -> flag name without dashes, where the CLI spells it otherwise (``inputs`` -> ``input``).
        helps: field -> help text overriding the docstring's.
        required: fields whose flag must be given.
        defaults: field -> default shown and used instead of the dataclass's (e.g. a required field's).

    bool fields get ``--x / --no-x``; tuple and list fields take several values (``--x a b`` or ``--x a,b``).
    """
    skip, required = set(skip), set(required)
    names, helps, defaults = names or {}, helps or {}, defaults or {}
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        flag = "--" + names.get(f.name, f.name).replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "help": helps.get(f.name, docs.get(f.name, ""))}
        if f.name in required:
            kwargs.update(required=True, default=argparse.SUPPRESS)  # no "(default: None)" in the help
        elif f.name in defaults:
            kwargs["default"] = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs.update(required=True, default=argparse.SUPPRESS)
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kind, many = _flag_type(hints[f.name], f"{cls.__name__}.{f.name}")
        if many:  # "--x a b" or "--x a,b"; an empty default may be given as "--x" alone
            empty = kwargs.get("default") in ([], ())
            parser.add_argument(flag, type=_comma_split(kind), nargs="*" if empty else "+", action=_Extend,
                                **kwargs)
        else:
            parser.add_argument(flag, type=kind, **kwargs)


def _comma_split(kind: type):
    def parse(text: str) -> list:
        return [kind(part) for part in text.split(",") if part.strip()]
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" errors
    return parse


class _Extend(argparse.Action):
    """Collects the values of a sequence flag into one flat list (each value may hold several, comma-separated)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [item for value in values for item in value])


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """A dataclass config from parsed CLI arguments: every field whose name is an argument's ``dest``,
    then ``overrides``."""
    hints = typing.get_type_hints(cls)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for name, value in values.items():  # argparse collects several values in a list
        if isinstance(value, list) and _is_tuple(hints[name]):
            values[name] = tuple(value)
    return cls(**{**values, **overrides})


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))
