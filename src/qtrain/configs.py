"""One base for every frozen config in qtrain: validated when built, one JSON scheme.

A config is a frozen dataclass deriving from ``Config``. Building one checks every field
against its annotation (``qtrain.validation.check_fields``: the message names the class, the
field, the bad value and what is allowed), then ``validate()`` checks ranges and
combinations. ``to_dict``/``from_dict`` use one scheme for every config: enums by value,
tuples as lists, and a nested frozen value (a format, a granularity, a scale rule, a
``QuantSpec``) as a dict tagged with its class name, ``{"type": "Int", "bits": 8, ...}``, so
that a union-typed field reads back as the right class.

>>> import dataclasses
>>> @dataclasses.dataclass(frozen=True)
... class Example(Config):
...     bits: int = 8
...     ratios: tuple[float, ...] = (0.5,)
>>> Example.from_dict({"bits": 4.0, "ratios": [1]})
Example(bits=4, ratios=(1.0,))
>>> Example(bits=4).to_dict()
{'bits': 4, 'ratios': [0.5]}
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import types
import typing
from typing import Any, ClassVar, TypeVar

from qtrain.validation import check_fields, describe

C = TypeVar("C", bound="Config")


class Config:
    """Mixin for frozen dataclasses (see the module docstring).

    Class attributes: ``error``, the exception every refusal raises; ``option``, the word for
    a field in messages about unknown names ("parameter", "train option").
    """

    error: ClassVar[type[Exception]] = ValueError
    option: ClassVar[str] = "parameter"

    def __post_init__(self) -> None:
        check_fields(self, self.error)
        self.validate()

    def validate(self) -> None:
        """Raise ``error`` naming the field, the value and what is allowed (ranges, combos)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from ``to_dict()``'s form (JSON values); omitted fields take their defaults."""
        if not isinstance(data, dict):
            raise cls.error(f"{cls.__name__} must be built from a mapping, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise cls.error(
                f"unknown {cls.option}(s) {unknown} for {cls.__name__}; allowed: {names}"
            )
        hints = field_types(cls)
        values = {
            key: from_jsonable(f"{cls.__name__} {cls.option} {key!r}", value, hints[key], cls.error)
            for key, value in data.items()
        }
        try:
            return cls(**values)
        except TypeError as err:  # a required field is missing
            raise cls.error(f"{cls.__name__}: {err}") from None

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def with_changes(self: C, **changes: Any) -> C:
        """A copy with some fields changed, validated like a new config."""
        return type(self).from_dict({**self.to_dict(), **to_jsonable(changes)})


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of a dataclass."""
    return typing.get_type_hints(cls)


def to_jsonable(value: Any) -> Any:
    """A value in the JSON scheme: enums by value, tuples as lists, dataclasses tagged."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__name__, **fields}
    return value


# What a JSON value of a plain field type must be, in the words of a ``--set`` user.
_EXPECTED = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _refusal(what: str, value: Any, expected: str, error: type[Exception]) -> Exception:
    return error(f"{what}: expected {expected}, got {value!r} ({type(value).__name__})")


def from_jsonable(
    what: str, value: Any, kind: Any, error: type[Exception], in_union: bool = False
) -> Any:
    """The inverse of ``to_jsonable`` for a field annotated ``kind``: a JSON number for an
    int field must be integral (stored as int), an int for a float field becomes a float, a
    lone value for a tuple field is a one-item tuple, a tagged dict becomes its class.
    Annotations it does not know pass the value through for ``check_fields`` to judge."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        arms = typing.get_args(kind)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return from_jsonable(what, value, arm, error, in_union=True)
            except error:
                continue
        raise _refusal(what, value, describe(kind), error)
    if kind is bool or kind is str:
        if not isinstance(value, kind):
            raise _refusal(what, value, _EXPECTED[kind], error)
        return value
    if kind is int or kind is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (kind is int and int(value) != value):
            raise _refusal(what, value, _EXPECTED[kind], error)
        return kind(value)
    origin = typing.get_origin(kind)
    if origin is tuple:
        item = typing.get_args(kind)[0]
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(from_jsonable(what, v, item, error) for v in items)
    if origin is typing.Literal:
        # Checked here only as a union's arm (to try the next); check_fields says the rest.
        if in_union and value not in typing.get_args(kind):
            raise _refusal(what, value, describe(kind), error)
        return value
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise _refusal(what, value, describe(kind), error) from None
    if isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, dict):
        fields = dict(value)
        tag = fields.pop("type", kind.__name__)
        if tag != kind.__name__:
            raise _refusal(what, tag, describe(kind), error)
        if issubclass(kind, Config):
            return kind.from_dict(fields)
        hints = field_types(kind)
        try:
            return kind(
                **{k: from_jsonable(f"{what}.{k}", v, hints[k], error) for k, v in fields.items()}
            )
        except (TypeError, KeyError) as err:
            raise error(f"{what}: cannot build a {kind.__name__} from {value!r} ({err})") from None
    return value
