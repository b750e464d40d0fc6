"""Generic checks of config fields: the type from the dataclass annotation, finiteness, and a declared range.

Every config class declares the range of its numeric fields in a ``field_ranges`` class attribute, e.g.
``{"train_learning_rate": "> 0", "train_adam_beta1": "[0, 1)"}``; :func:`check_fields` merges them over
the class hierarchy and checks every field once, before any method-specific check runs, so that a bad
value is always reported by the field's name (``"<field>: <what was expected>, got <value>"``) and never
as a ``ZeroDivisionError`` or a dependency's error later on. Values are never coerced into a different
meaning (``'False'`` is not a bool); lossless normalisations are applied (an ``int`` given for a float
field becomes a float, a tuple for a list field a list, a ``pathlib.Path`` for a path field a string).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import types
import typing
from functools import lru_cache
from typing import Any, Literal

#: fields that name a file-system location: an ``os.PathLike`` is accepted and stored as a string
PATH_FIELDS = ("logdir", "output_dir", "resume_from", "init_from")

_RANGE = re.compile(r"^\s*(?:(?P<op>>=|>|<=|<)\s*(?P<bound>\S+)|(?P<lo_b>[\[(])\s*(?P<lo>\S+)\s*,\s*(?P<hi>\S+)\s*(?P<hi_b>[\])]))\s*$")


def fail(name: str, expected: str, value: Any) -> None:
    """Raise the ``ValueError`` every config check raises: ``"<name>: <expected>, got <value>"``."""
    raise ValueError(f"{name}: {expected}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval parsed from ``"> 0"``, ``">= 1"``, ``"<= 5"``, ``"[0, 1)"`` or ``"(0, 1]"`` (bounds may be numbers)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @classmethod
    def parse(cls, spec: str) -> Range:
        m = _RANGE.match(spec)
        if m is None:
            raise ValueError(f"invalid range specification {spec!r}")
        if m.group("op"):
            op, bound = m.group("op"), float(m.group("bound"))
            if op.startswith(">"):
                return cls(lo=bound, lo_open=op == ">")
            return cls(hi=bound, hi_open=op == "<")
        return cls(lo=float(m.group("lo")), hi=float(m.group("hi")), lo_open=m.group("lo_b") == "(", hi_open=m.group("hi_b") == ")")

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))

    def describe(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else repr(v)

        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {num(self.hi)}"


def field_ranges(cls: type) -> dict[str, Range]:
    """The ``field_ranges`` of ``cls`` and its bases (a subclass's entry overrides its base's)."""
    return dict(_field_ranges(cls))


@lru_cache(maxsize=None)
def _field_ranges(cls: type) -> tuple[tuple[str, Range], ...]:
    merged: dict[str, Range] = {}
    for klass in reversed(cls.__mro__):
        for name, spec in klass.__dict__.get("field_ranges", {}).items():
            merged[name] = Range.parse(spec)
    return tuple(merged.items())


@lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the annotations are strings under ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(config: Any) -> None:
    """Check (and losslessly normalise) every field of the dataclass ``config`` against its annotation and range."""
    cls = type(config)
    ranges = field_ranges(cls)
    unknown = set(ranges) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__}.field_ranges names fields that do not exist: {sorted(unknown)}")
    for name, annotation in field_types(cls).items():
        value = getattr(config, name)
        if name in PATH_FIELDS and isinstance(value, os.PathLike):
            value = os.fspath(value)
        value = check_value(name, value, annotation, ranges.get(name))
        setattr(config, name, value)


def check_value(name: str, value: Any, annotation: Any, bounds: Range | None = None) -> Any:
    """``value`` checked against ``annotation`` (and ``bounds`` for numbers and lists of numbers); returns it normalised."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None:
            if len(options) < len(args):
                return None
            fail(name, f"expected {describe_type(annotation)}", value)
        if len(options) == 1:
            return check_value(name, value, options[0], bounds)
        for option in options:  # e.g. Literal[...] | str: the first that accepts the value
            try:
                return check_value(name, value, option, bounds)
            except ValueError:
                continue
        fail(name, f"expected {describe_type(annotation)}", value)
    if origin is Literal:
        if not any(value == choice and type(value) is type(choice) for choice in args):
            fail(name, f"must be one of {list(args)}", value)
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            fail(name, "expected a bool (True or False; strings such as 'False' are not accepted)", value)
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            fail(name, "expected an integer", value)
        value = int(value)
        if bounds is not None and not bounds.contains(value):
            fail(name, f"must be an integer {bounds.describe()}", value)
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            fail(name, "expected a number", value)
        value = float(value)
        if not math.isfinite(value):
            fail(name, "must be a finite number", value)
        if bounds is not None and not bounds.contains(value):
            fail(name, f"must be {bounds.describe()}", value)
        return value
    if annotation is str:
        if not isinstance(value, str):
            fail(name, "expected a string", value)
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail(name, f"expected {describe_type(annotation)}", value)
        if not value:
            fail(name, f"must be a non-empty list of {describe_type(args[0], plural=True)}", value)
        items = []
        for i, item in enumerate(value):
            try:
                items.append(check_value(f"{name}[{i}]", item, args[0], bounds))
            except ValueError as err:
                raise ValueError(f"{name}: expected {describe_type(annotation)}"
                                 f"{' ' + bounds.describe() if bounds is not None else ''}, got {value!r} ({err})") from None
        return items
    if origin is dict:
        if not isinstance(value, dict):
            fail(name, "expected a dict", value)
        key_type = args[0] if args else Any
        if key_type is str and not all(isinstance(k, str) for k in value):
            fail(name, "expected a dict with string keys", value)
        return value
    if annotation is Any:
        return value
    raise TypeError(f"{name}: no check for the annotation {annotation!r}; add one to trl_gfn.configs.validation")


def describe_type(annotation: Any, plural: bool = False) -> str:
    """A short human name of an annotation (for error messages); ``plural`` for the items of a list."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or None" if type(None) in args else "")
    if origin is Literal:
        return "one of " + str(list(args))
    if origin is list:
        return f"a list of {describe_type(args[0], plural=True)}"
    if origin is dict:
        return "a dict"
    names = {bool: ("a bool", "bools"), int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}
    if annotation in names:
        return names[annotation][plural]
    return getattr(annotation, "__name__", str(annotation))


def check_name(name: str, value: str, *, allow_empty: bool) -> None:
    """A run or experiment name is one directory level: no separators, not ``.``/``..``, no NUL or control characters."""
    if not value and allow_empty:
        return
    separators = {os.sep, "/", "\\"} | ({os.altsep} if os.altsep else set())
    if (not value or value in (".", "..") or any(s in value for s in separators)
            or any(ord(ch) < 32 for ch in value) or value != value.strip()):
        fail(name, "must be a plain folder name (no '/', '\\', '.', '..', control characters or surrounding spaces)"
             + (" or empty" if allow_empty else ""), value)


def check_kwargs(name: str, value: dict[str, Any], target: Any, *, reserved: dict[str, str]) -> None:
    """Keys of a kwargs dict must be parameters of ``target`` and not one the config sets from a field (``reserved``)."""
    import inspect

    params = inspect.signature(target).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in value:
        if key in reserved:
            fail(name, f"must not set {key!r}: it is set from {reserved[key]}", value)
        if not accepts_any and (key not in params or key == "self"):
            allowed = sorted(k for k in params if k not in reserved and k != "self")
            fail(name, f"{key!r} is not an argument of {getattr(target, '__qualname__', target)}; expected keys among {allowed}", value)


__all__ = ["PATH_FIELDS", "Range", "check_fields", "check_kwargs", "check_name", "check_value", "describe_type", "fail",
           "field_ranges", "field_types"]
