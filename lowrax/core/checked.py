"""Typed, range-checked config dataclasses: one validator for every config section.

A config section is a frozen dataclass whose fields carry their type and, where it matters, their
range or choices in the annotation; `Checked.__post_init__` checks every field before anything
else runs, and converts what YAML and the command line give into the declared form (a list into a
tuple, an integer into a float, `1e3` into 1000 for an integer field):

    @dataclass(frozen=True)
    class TrainSection(Checked):
        steps: PositiveInt = 30
        schedule: Annotated[str, OneOf(("cosine", "linear"))] = "cosine"

A bad value raises `ConfigValueError` naming the key, the value given and what is expected
(with the closest choice for a misspelt one); `lowrax train` renames the owner to the section
(`train.batch_size must be an integer >= 1, got -3`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from lowrax.errors import LowraxError


@dataclass(frozen=True)
class Bound:
    """A numeric range: low <= value (or <) and value <= high (or <); None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {_number(self.low)}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {_number(self.high)}"
        if low and high:
            return f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"
        return low or high or ""

    def hint(self, value) -> str:
        return ""


@dataclass(frozen=True)
class PowerOfTwo:
    """An integer power of two."""

    def holds(self, value) -> bool:
        return value > 0 and value & (value - 1) == 0

    def describe(self) -> str:
        return "that is a power of two"

    def hint(self, value) -> str:
        return ""


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (a registry's names are checked by the registry instead)."""

    choices: tuple

    def holds(self, value) -> bool:
        return value in self.choices

    def describe(self) -> str:
        return "one of " + ", ".join(str(c) for c in self.choices)

    def hint(self, value) -> str:
        close = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
        return f"; did you mean {close[0]!r}?" if close else ""


PositiveInt = Annotated[int, Bound(low=1)]
Count = Annotated[int, Bound(low=0)]  # zero allowed: "none", "off" or "only at the end"
PositiveFloat = Annotated[float, Bound(low=0, low_open=True)]
NonNegativeFloat = Annotated[float, Bound(low=0)]
Probability = Annotated[float, Bound(0, 1, high_open=True)]  # dropout-like: 1 would drop everything
Share = Annotated[float, Bound(0, 1)]
OpenUnit = Annotated[float, Bound(0, 1, low_open=True, high_open=True)]  # moving-average factors


class ConfigValueError(LowraxError):
    """A config field whose value is not of its declared type, range or choices."""

    def __init__(self, owner: str, key: str, value, expected: str, hint: str = ""):
        self.owner, self.key, self.value, self.expected, self.hint = owner, key, value, expected, hint
        name = f"{owner}.{key}" if owner else key  # no owner: a top-level key
        super().__init__(f"{name} must be {expected}, got {shown(value)}{hint}")

    def named(self, owner: str) -> "ConfigValueError":
        """The same error with the owner a user wrote (a config section: `train`, `lora`)."""
        return ConfigValueError(owner, self.key, self.value, self.expected, self.hint)


class Checked:
    """Mixin of config dataclasses: every field is checked against its annotation on creation.
    Subclasses with their own `__post_init__` call this one first, then check relations
    between fields. A plain class attribute `section_name` names the fields in errors."""

    section_name = ""

    def __post_init__(self):
        check_fields(self)


def check_fields(config) -> None:
    """Check (and convert in place) every field of the dataclass instance `config`."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            checked = _check(hints[f.name], value)
        except _Mismatch as e:
            raise ConfigValueError(owner_name(config), f.name, value, e.expected, e.hint) from None
        if checked is not value:
            object.__setattr__(config, f.name, checked)


def owner_name(config) -> str:
    """How errors name a config's fields: its section's name where it has one (`train.steps`), else its
    class's (`LoraConfig.r`, whose section is named after the method)."""
    return getattr(type(config), "section_name", None) or type(config).__name__


class _Mismatch(Exception):
    def __init__(self, expected: str, hint: str = ""):
        super().__init__(expected)
        self.expected, self.hint = expected, hint


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=True)


def _check(tp, value):
    """`value` in the form `tp` declares, or _Mismatch saying what was expected."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *constraints = typing.get_args(tp)
        try:
            value = _check(base, value)
        except _Mismatch as e:  # "a finite number > 0": what the base missed, then the range
            choices = any(isinstance(c, OneOf) for c in constraints)
            raise _Mismatch(describe(tp) if choices else " ".join([e.expected] + [c.describe() for c in constraints]))

        for constraint in constraints:
            if not constraint.holds(value):
                raise _Mismatch(describe(tp), constraint.hint(value))
        return value
    if origin in (Union, types.UnionType):
        return _check_union(typing.get_args(tp), value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise _Mismatch(describe(tp), f"; did you mean {close[0]!r}?" if close else "")
    if origin is tuple:
        return _check_tuple(tp, value)
    check = _SCALARS.get(tp)
    if check is not None:
        return check(value)
    if tp is Any or tp is object:
        return value
    if isinstance(tp, type) and isinstance(value, tp):  # a nested section or another class
        return value
    raise _Mismatch(describe(tp))


def _check_union(arms, value):
    for arm in arms:
        try:
            return _check(arm, value)
        except _Mismatch:
            continue
    raise _Mismatch(" or ".join(describe(arm) for arm in arms))


def _check_tuple(tp, value):
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise _Mismatch(describe(tp))
    args = typing.get_args(tp)
    if not args:
        return tuple(value)
    element = args[0]
    try:
        return tuple(_check(element, v) for v in value)
    except _Mismatch:
        raise _Mismatch(describe(tp)) from None


def _integer(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Mismatch("an integer")
    if isinstance(value, numbers.Integral):
        return int(value)
    if math.isfinite(value) and float(value).is_integer():  # 1e3 from YAML
        return int(value)
    raise _Mismatch("an integer")


def _real(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Mismatch("a number")
    if not math.isfinite(value):
        raise _Mismatch("a finite number")
    return value if type(value) is float else float(value)


def _exact(kind: type, name: str):
    def check(value):
        if isinstance(value, bool) and kind is not bool:
            raise _Mismatch(name)
        if not isinstance(value, kind):
            raise _Mismatch(name)
        return value
    return check


def _none(value):
    if value is not None:
        raise _Mismatch("null")
    return value


_SCALARS = {int: _integer, float: _real, bool: _exact(bool, "true or false"), str: _exact(str, "a string"),
            dict: _exact(dict, "a mapping"), type(None): _none}

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
          type(None): "null"}


def describe(tp) -> str:
    """A type annotation in words: `an integer >= 1`, `one of cosine, linear`, `a list of strings`."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *constraints = typing.get_args(tp)
        if any(isinstance(c, OneOf) for c in constraints):  # the choices say it all
            return " ".join(c.describe() for c in constraints)
        return " ".join([describe(base)] + [c.describe() for c in constraints])
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arm) for arm in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(words: str) -> str:
    for article in ("an ", "a "):
        if words.startswith(article):
            noun, _, rest = words[len(article):].partition(" ")
            return f"{noun}s {rest}".strip()
    return words


def _number(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def conforms(tp, value) -> bool:
    """Whether `value` is of the annotated type `tp` (range and choices included)."""
    try:
        _check(tp, value)
    except _Mismatch:
        return False
    return True


def shown(value) -> str:
    """A value as errors quote it: its repr, cut at 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
