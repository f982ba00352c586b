"""Typed checking of a declared message's body, shared by every wire protocol of EPD.

A body that arrives over a process boundary is a msgpack map; `check_typed` builds the dataclass
only when every field has its annotated type (nested messages checked the same way) and the
protocol's own `limits` find nothing out of range. Anything else is a `ProtocolError` naming the
field, never a crash of the process that got it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any


class ProtocolError(ValueError):
    pass


def _no_limits(msg: Any) -> str:
    return ""


def check_typed(cls: type, body: Any, limits: Callable[[Any], str] = _no_limits) -> Any:
    """`cls(**body)` once every field has its declared type and the message's limits hold."""
    if not isinstance(body, dict):
        raise ProtocolError(f"{cls.__name__}: body is not a map")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(body) - names
    if unknown:
        raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(map(str, unknown))}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in body
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ProtocolError(f"{cls.__name__}: missing fields {missing}")
    values = {name: _typed(value, hints[name], f"{cls.__name__}.{name}", limits)
              for name, value in body.items()}
    msg = cls(**values)
    problem = limits(msg)
    if problem:
        raise ProtocolError(f"{cls.__name__}: {problem}")
    return msg


def _typed(value: Any, hint: Any, where: str, limits: Callable[[Any], str]) -> Any:
    """`value` as `hint` says (nested messages built), or ProtocolError naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _typed(value, arm, where, limits)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: {type(value).__name__} is none of {hint}")
    if hint is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(hint):
        return check_typed(hint, value, limits)
    elif origin is list or hint is list:
        if isinstance(value, list):
            if args and args[0] is int and all(type(v) is int for v in value):   # token ids: long lists, fast
                return value
            return [_typed(v, args[0], f"{where}[]", limits) for v in value] if args else value
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return {_typed(k, args[0], f"{where} key", limits): _typed(v, args[1], f"{where}[{k!r}]", limits)
                    for k, v in value.items()} if args else value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < 1 << 64:
            return value
    elif isinstance(value, hint):
        return value
    raise ProtocolError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
