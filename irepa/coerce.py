"""Command-line values -> the declared type of the config field or function parameter they set.

fire hands options over as strings (`--train.resume false` is the non-empty, so true, string
'false') or as whatever its literal parser made of them (`2.5`, `(0.9, 0.95)`). `coerce`
converts such a value to an annotation (bool, int, float, str, Literal choices, Optional,
list[...] and tuple[...] of those) or raises `BadValue`, a one-line UserError naming the key,
the value and the expected type. Used by irepa.config (every override) and irepa.cli (every
launch script option). Imports nothing of irepa but irepa.errors.
"""
from __future__ import annotations

import inspect
import math
import types
import typing
from typing import Any, Literal, Union

from irepa.errors import UserError

TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off")
NONE_WORDS = ("none", "null")


class BadValue(UserError, ValueError):
    """An option value that is not of its declared type (or not one of its choices)."""


class _Mismatch(Exception):
    pass


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` as `annotation` (see the module doc); BadValue naming `key` when it is not one."""
    try:
        return _convert(value, annotation)
    except _Mismatch:
        raise BadValue(f"{key}: expected {type_name(annotation)}, got {value!r}") from None


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _convert(v: Any, tp: Any) -> Any:
    if tp is Any or tp is inspect.Parameter.empty:
        return v
    if _is_union(tp):
        return _union(v, typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if v == choice and type(v) is type(choice) or str(v).strip() == str(choice):
                return choice
        raise _Mismatch
    if origin in (list, tuple) or tp in (list, tuple):
        return _sequence(v, tp, origin or tp)
    if isinstance(tp, type) and tp in _SCALARS:
        return _SCALARS[tp](v)
    if isinstance(tp, type):
        if isinstance(v, tp):
            return v
        raise _Mismatch
    return v  # an annotation this module does not interpret


def _union(v: Any, args: tuple) -> Any:
    if type(None) in args:
        if v is None:
            return None
        # a word for None, unless a string field could mean the word itself (a folder named "none")
        if isinstance(v, str) and v.strip().lower() in NONE_WORDS and (str not in args or v.strip() == "None"):
            return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(v, arg)
        except _Mismatch:
            pass
    raise _Mismatch


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return v.strip().lower() in TRUE_WORDS
    raise _Mismatch


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise _Mismatch
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            v = _float(v)
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():  # 4e5 is an integer, 2.5 is not
        return int(v)
    raise _Mismatch


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise _Mismatch
    f = _float(v) if isinstance(v, str) else float(v) if isinstance(v, (int, float)) else None
    if f is None or not math.isfinite(f):
        raise _Mismatch
    return f


def _to_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):  # fire read `--out 2024` as a number
        return str(v)
    raise _Mismatch


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _float(s: str) -> float | None:
    try:
        return float(s.strip())
    except ValueError:
        return None


def _sequence(v: Any, tp: Any, origin: type) -> list | tuple:
    args = typing.get_args(tp)
    if isinstance(v, str):
        text = v.strip()
        if text[:1] in "[(" and text[-1:] in ")]":
            text = text[1:-1]
        items = [s.strip().strip("'\"") for s in text.split(",")]
        items = [s for s in items if s] if not (len(items) == 1 and items[0] == "") else []
    elif isinstance(v, (list, tuple)):
        items = list(v)
    elif v is None:
        raise _Mismatch
    else:
        items = [v]  # one value for a list: a list of one
    if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length
        if len(items) != len(args):
            raise _Mismatch
        return tuple(_convert(x, a) for x, a in zip(items, args))
    elem = args[0] if args else Any
    out = [_convert(x, elem) for x in items]
    return tuple(out) if origin is tuple else out


def type_name(tp: Any) -> str:
    """How an error message names the type: 'an integer', 'one of 'conv', 'mlp'', ..."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        none = " or None" if len(args) < len(typing.get_args(tp)) else ""
        return " or ".join(type_name(a) for a in args) + none
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"{len(args)} values ({', '.join(_plain(a) for a in args)}) as A,B"
        return f"a list of {_plain(args[0]) if args else 'values'} (A,B or [A, B])"
    return {bool: "a boolean (true/false, 1/0, yes/no)", int: "an integer", float: "a number",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _plain(tp: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(tp, type_name(tp))


def annotations_of(obj: Any) -> dict[str, Any]:
    """Resolved annotations of a function or dataclass (string annotations evaluated); {} if unresolvable."""
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an annotation naming something its module cannot resolve: leave it unchecked
        return {}
