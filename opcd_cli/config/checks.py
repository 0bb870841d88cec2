"""The checks every setting goes through: its type (nothing is converted: the string "false" is not false),
and the ranges and choices the option records use."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import fields
from functools import lru_cache
from typing import Any

from ..errors import OpcdError

# Recipes are TOML written by hand, so a value can have the wrong type and still look right: the string
# "false" is truthy. Every value must have the type its field declares; nothing is converted.

_DESCRIBE = {bool: "true or false (a boolean, not a string or a number)", int: "a whole number",
             float: "a finite number", str: "a string", dict: "a table", tuple: "a list"}


@lru_cache(maxsize=None)
def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(hint) -> tuple[tuple, bool]:
    """(accepted base types, whether None is allowed) of a field's type hint."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        bases = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
        return bases, type(None) in args
    return (typing.get_origin(hint) or hint,), False


def _fits(value: Any, base) -> bool:
    if dataclasses.is_dataclass(base):
        return isinstance(value, base)
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, base)


def check_value(name: str, value: Any, hint, where: str = "") -> None:
    """An ``OpcdError`` naming the setting, the value and the expected type when ``value`` does not fit ``hint``."""
    bases, optional = _allowed(hint)
    if (value is None and optional) or any(_fits(value, base) for base in bases):
        return
    expected = " or ".join(_DESCRIBE.get(b, getattr(b, "__name__", str(b))) for b in bases)
    raise OpcdError(f"{where}{name} must be {expected}; got {value!r}")


def check_types(obj) -> None:
    for f in fields(obj):
        check_value(f.name, getattr(obj, f.name), hints(type(obj))[f.name])


SEED_LIMIT = 2**63 - 1  # torch.manual_seed takes 64 bits; the seeds derived per process and step add to it


def check_seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_LIMIT - 2**40:
        raise OpcdError(f"seed must be a whole number from 0 to {SEED_LIMIT - 2**40}; got {value!r}")


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OpcdError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise OpcdError(f"{name} must be a fraction in (0, 1]; got {value!r}")


def at_least(name: str, value: Any, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise OpcdError(f"{name} must be a number of at least {low:g}; got {value!r}")


def positive(name: str, value: Any) -> None:
    if not value > 0:
        raise OpcdError(f"{name} must be positive; got {value}")
