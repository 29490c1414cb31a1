"""Typed, range-checked dataclass fields: the one checker behind every ``--set TARGET.FIELD=VALUE``.

A configuration (a backbone's config, a method's hyper-parameters) is a dataclass. Its field annotations give
the type (``int``, ``float``, ``str``, ``bool``, ``tuple[int, ...]``, ``list[float]``, ``X | None``) and
``field(metadata=...)`` may add ``choices`` (allowed values), ``min`` / ``max`` (inclusive bounds; for a
sequence, of every item) and ``nonempty`` (a sequence needs an item). ``check_fields`` converts what the
command line gave (JSON-parsed: numbers, booleans, lists, strings) into those types and refuses anything else
with a message that names the field, the value and what is allowed, before any data is read.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from bench.base.errors import UserError


def choice(default: Any, choices: tuple, **extra) -> Any:
    """A field whose value must be one of ``choices``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices), **extra})


def bounded(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **limits) -> Any:
    """A field with ``min`` / ``max`` (inclusive) and optionally ``nonempty``."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata=limits)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        item = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(typing.get_args(tp)[0],
                                                                                         "values")
        return f"a list of {item}, e.g. [1, 2]"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or raise ValueError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg)
            except ValueError:
                pass
        raise ValueError
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError
        item = typing.get_args(tp)[0]
        return origin(_convert(v, item) for v in value)
    if tp is type(None):
        if value is None:
            return None
        raise ValueError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if tp is Any:
        return value
    raise ValueError


def check_value(owner: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """One field's value converted and checked; ``owner`` names the ``--set`` target in messages."""
    where = f"--set {owner}.{f.name}={_show(value)}"
    try:
        out = _convert(value, tp)
    except ValueError:
        raise UserError(f"{where}: {f.name} must be {_describe(tp)}.") from None
    meta = f.metadata
    if "choices" in meta and out not in meta["choices"]:
        raise UserError(f"{where}: {f.name} must be one of {', '.join(map(str, meta['choices']))}.")
    items = out if isinstance(out, (list, tuple)) else [out]
    if meta.get("nonempty") and isinstance(out, (list, tuple)) and not out:
        raise UserError(f"{where}: {f.name} needs at least one value.")
    for v in items:
        if v is None:
            continue
        if "min" in meta and v < meta["min"]:
            raise UserError(f"{where}: {f.name} must be >= {meta['min']}.")
        if "max" in meta and v > meta["max"]:
            raise UserError(f"{where}: {f.name} must be <= {meta['max']}.")
    return out


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_fields(cls: type, owner: str, changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` for dataclass ``cls`` converted and checked field by field (unknown names refused)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    out = {}
    for name, value in changes.items():
        if name not in fields:
            raise UserError(f"--set {owner}.{name}: {owner} has no field {name!r}. "
                            f"Fields: {', '.join(sorted(fields)) or '(none)'}.")
        out[name] = check_value(owner, fields[name], hints[name], value)
    return out


def check_instance(obj: Any, owner: str) -> None:
    """Every field of a dataclass instance checked (values given in Python rather than on the command line)."""
    check_fields(type(obj), owner, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                                    if f.init and not f.name.startswith("_")})
