"""Configuration as plain dataclasses, and the one way every ``bbert`` command reads it.

Each stage's config is a dataclass beside the code it configures (``PrepareConfig``,
``TrainConfig``, ``FinetuneConfig``, ...). This module turns YAML files, dicts and
``--set KEY=VALUE`` assignments into those dataclasses (one function for all of them,
:func:`build_config`), checking each value against its annotation, and gives the commands one
error convention: bad input prints one line naming the problem and the fix, then exits 2
(``BBERT_DEBUG=1`` shows the traceback instead).

Chapter: ``notebooks/04_pretraining.ipynb`` (configs and the command line).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T")


class UsageError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""


# What a command reports as one line and exit 2: bad values (ValueError and the stage errors
# derived from it), missing or unwritable files and an unreachable hub (both OSError).
BAD_INPUT = (ValueError, OSError)


# ---- dict -> dataclass ------------------------------------------------------------------


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly partial) ``data``, checking every value.

    Nested dataclasses come from nested dicts; strings are parsed for non-string fields
    (``"5e-4"`` for a float, ``"true"`` for a bool, ``"[0.9, 0.98]"`` for a tuple), so values from
    YAML and from ``--set`` go through the same checks. Unknown keys are an error that suggests
    the nearest field.
    """
    if not isinstance(data, dict):
        raise UsageError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping of its fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise UsageError(unknown_key_message(prefix + str(key), names))
        kwargs[key] = coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def unknown_key_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown config field {key!r}.{hint} Known fields: {', '.join(known)}"


def coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the type ``hint`` asks for, or a ``UsageError`` naming ``name``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, name)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"{name} must not be empty")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if value is None:
            return hint()
        return from_dict(hint, parse_value(value, name), prefix=f"{name}.")
    if hint is bool:
        value = parse_value(value, name)
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        return _number(name, value, hint)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UsageError(f"{name} must be a string, got {value!r}")
        return str(value)
    if origin in (list, tuple) or hint in (list, tuple):
        value = parse_value(value, name)
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{name} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UsageError(f"{name} must have {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or hint) is tuple else items
    if origin is dict or hint is dict:
        value = parse_value(value, name)
        if not isinstance(value, dict):
            raise UsageError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    return value


def parse_value(value: Any, name: str = "value") -> Any:
    """A ``--set`` string read as YAML (``[0.9, 0.98]`` is a list); bad YAML is a ``UsageError``."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:  # e.g. an unclosed bracket: "[0.9"
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise UsageError(f"{name} is not valid YAML ({problem}), got {value!r}; write a list as "
                         "[0.9, 0.98] and a mapping as {key: value}, quoted in the shell") from None


def _number(name: str, value: Any, kind: type) -> int | float:
    # YAML 1.1 reads "5e-4" as a string: accept it, and name the field when it is not a number
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if kind is int:
        if number != int(number):
            raise UsageError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return number


def to_dict(config: Any) -> dict:
    """A plain dict of a dataclass (tuples as lists) that YAML and JSON can hold."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


# ---- YAML files and --set ---------------------------------------------------------------


def load_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML config file, or a ``UsageError`` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no config file at {path}: check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of config fields, got {type(data).__name__}")
    return data


def parse_assignments(assignments: typing.Iterable[str]) -> dict[str, str | None]:
    """``["lr=5e-4", "early_stop.enabled=true"]`` -> ``{"lr": "5e-4", "early_stop.enabled": "true"}``.

    Values stay strings here; :func:`from_dict` parses them against each field's type, so a path
    such as ``run_dir=007`` stays ``"007"``. An empty value is ``None``.
    """
    out: dict = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {item!r} must look like KEY=VALUE (e.g. --set lr=5e-4)")
        out[key] = raw.strip() if raw.strip() else None
    return out


def merge(base: dict, update: dict) -> dict:
    """``update`` laid over ``base``, recursing into nested mappings."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(cls: type[T], base: Any = None, config_file: str | os.PathLike | None = None,
                 assignments: typing.Iterable[str] = (), updates: dict | None = None) -> T:
    """The one way a config is assembled: ``cls`` from ``base``, a YAML file, ``--set``, then ``updates``.

    ``base`` is a preset's dict or a config object; the YAML file's mapping is merged over it,
    then each ``--set KEY=VALUE`` assignment, then each ``updates`` item (``{"lr": 1e-3,
    "early_stop.enabled": True}``). A dotted key replaces the value at that path, so
    ``model_overrides={}`` empties a mapping. Where a dotted key lands is the class's to say:
    ``cls.dotted_key(key, value) -> (key, value)``, when the class has one (``TrainConfig`` sends
    ``model.X`` to ``model_overrides.X``). Every value is then checked by :func:`from_dict`.
    """
    data = to_dict(base) if dataclasses.is_dataclass(base) else copy.deepcopy(dict(base or {}))
    if config_file:
        data = merge(data, load_yaml(config_file))
    rename = getattr(cls, "dotted_key", None)
    for what, items in (("--set", parse_assignments(assignments)), ("update", updates or {})):
        for key, value in items.items():
            key, value = rename(key, value) if rename else (key, value)
            _set_path(data, key, value, what)
    return from_dict(cls, data)


def _set_path(data: dict, key: str, value: Any, what: str) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if child is None:
            child = {}
        elif dataclasses.is_dataclass(child):
            child = to_dict(child)
        elif isinstance(child, dict):
            child = dict(child)
        else:
            raise UsageError(f"{what} {key!r}: {part!r} is {child!r}, not a group of fields; "
                             f"set {part!r} itself, or a field of a group")
        node[part] = child
        node = child
    node[leaf] = value


# ---- the command-line convention --------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--config FILE`` and ``--set KEY=VALUE`` for the dataclass named ``what``."""
    parser.add_argument("--config", metavar="FILE", help=f"a YAML file of {what} fields")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one {what} field, e.g. --set seed=1 (repeatable; after --config)")


def command(prog: str) -> Callable[[Callable[[list[str] | None], int | None]], Callable[[list[str] | None], int]]:
    """Wrap a command's ``main(argv)``: bad input becomes one line ``prog: error: ...`` and exit 2."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return int(main(argv) or 0)
            except BAD_INPUT as e:
                if os.environ.get("BBERT_DEBUG"):
                    raise
                message = " ".join(str(e).split()) or type(e).__name__
                print(f"{prog}: error: {message}", file=sys.stderr)
                return 2
        return run
    return wrap
