"""Value checks shared by every validated constructor.

A refusal is one message naming the parameter, the bad value (with its type) and what is
allowed. Each caller passes its own error class (``FormatError``, ``QuantSpecError``, ...), so
a module's refusals keep one type. ``bool`` is not accepted where an int or a number is asked
for, although Python makes it an ``int``.

>>> check_type("Int.signed", 1, bool, TypeError)
Traceback (most recent call last):
    ...
TypeError: Int.signed must be a bool, got 1 (int)
>>> check_int("Int.bits", 0, TypeError, low=1, high=16)
Traceback (most recent call last):
    ...
TypeError: Int.bits must be an int in 1..16, got 0 (int)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any

_PLAIN_NAMES = {bool: "a bool", int: "an int", float: "a number", str: "a string"}


def refuse(what: str, value: Any, allowed: str, error: type[Exception]) -> typing.NoReturn:
    """Raise ``error``: "<what> must be <allowed>, got <value!r> (<type>)"."""
    raise error(f"{what} must be {allowed}, got {value!r} ({type(value).__name__})")


def _arms(kind: Any) -> tuple[Any, ...] | None:
    """The alternatives of a ``X | Y`` / ``Optional[X]`` annotation, else None."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return None


def matches(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of the annotated ``kind``: a plain type (bool, int, float taking
    ints, str), a class, a ``Literal``, an ``Enum``, a union with None, ``tuple[X, ...]``.
    ``dict[...]`` takes any dict. Annotations it does not know (``Any``, callables) accept
    every value."""
    if kind is type(None) or kind is None:
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    arms = _arms(kind)
    if arms is not None:
        return any(matches(value, arm) for arm in arms)
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(kind))
    if origin is dict:
        return isinstance(value, dict)
    if origin is tuple:
        item, *rest = typing.get_args(kind)
        return isinstance(value, tuple) and (
            rest != [Ellipsis] or all(matches(v, item) for v in value)
        )
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True


def describe(kind: Any) -> str:
    """What ``kind`` allows, in words: "a bool", "one of stochastic, nearest", ..."""
    if kind in _PLAIN_NAMES:
        return _PLAIN_NAMES[kind]
    if kind is type(None) or kind is None:
        return "None"
    arms = _arms(kind)
    if arms is not None:
        named = [describe(arm) for arm in arms if arm is not type(None)]
        if len(named) < len(arms):
            named.append("None")
        return ", ".join(named[:-1]) + " or " + named[-1]
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(kind))
    if origin is tuple:
        return f"a tuple with each item {describe(typing.get_args(kind)[0])}"
    if origin is dict:
        return "a mapping"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(f"{kind.__name__}.{m.name}" for m in kind)
    name = getattr(kind, "__name__", str(kind))
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def check_type(what: str, value: Any, kind: Any, error: type[Exception], allowed: str = "") -> None:
    """Raise ``error`` unless ``value`` is of ``kind`` (see ``matches``)."""
    if not matches(value, kind):
        refuse(what, value, allowed or describe(kind), error)


def check_int(
    what: str,
    value: Any,
    error: type[Exception],
    *,
    low: int | None = None,
    high: int | None = None,
) -> None:
    """Raise ``error`` unless ``value`` is an int (not a bool) in ``low..high``."""
    if high is not None:
        allowed = f"an int in {low}..{high}"
    elif low == 1:
        allowed = "a positive int (>= 1)"
    else:
        allowed = "an int" if low is None else f"an int >= {low}"
    ok = matches(value, int) and (low is None or value >= low)
    if not (ok and (high is None or value <= high)):
        refuse(what, value, allowed, error)


def check_number(what: str, value: Any, error: type[Exception], *, low: float, high: float) -> None:
    """Raise ``error`` unless ``value`` is a number (not a bool) in the closed [low, high]."""
    if not (matches(value, float) and low <= value <= high):  # NaN fails the comparison
        refuse(what, value, f"a number in [{low:g}, {high:g}]", error)


@functools.cache
def _field_kinds(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: Any, error: type[Exception]) -> None:
    """Check every field of the dataclass ``obj`` against its annotation (see ``matches``);
    an int given for a float field is stored as a float, so the object reads back the same
    from JSON. For frozen dataclasses, in ``__post_init__``."""
    cls = type(obj)
    kinds = _field_kinds(cls)
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        kind = kinds[field.name]
        check_type(f"{cls.__name__}.{field.name}", value, kind, error)
        if kind is float and isinstance(value, int):
            object.__setattr__(obj, field.name, float(value))
