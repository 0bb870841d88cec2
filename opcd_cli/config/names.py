"""Where each setting lives: flags and recipe keys name settings flat (``topk``, ``temperature``), and a
configuration holds them in groups (``loss.topk``, ``sampling.temperature``); this maps the one to the other."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from functools import lru_cache
from typing import Any

from .checks import hints


@lru_cache(maxsize=None)
def groups(cls) -> dict[str, type]:
    """The option records a configuration holds, by field name (``sampling``, ``loss``, ...)."""
    return {f.name: hints(cls)[f.name] for f in fields(cls) if dataclasses.is_dataclass(hints(cls)[f.name])}


@lru_cache(maxsize=None)
def owners(cls) -> dict[str, str | None]:
    """Every flat setting name of ``cls`` and the group that holds it (None: the configuration itself)."""
    found: dict[str, str | None] = {f.name: None for f in fields(cls) if f.name not in groups(cls)}
    for group, group_cls in groups(cls).items():
        found.update({f.name: group for f in fields(group_cls)})
    return found


def hint(cls, key: str):
    """The declared type of the flat setting ``key`` of ``cls``."""
    owner = owners(cls)[key]
    return hints(groups(cls)[owner] if owner else cls)[key]


def route(cls, settings: dict[str, Any]) -> dict[str, Any]:
    """``cls``'s constructor arguments from ``settings`` named flat (or whole groups): each group starts from the
    record given for it, else ``cls``'s own default (extract samples at temperature 1, eval greedily), and takes
    the flat settings it holds. A name ``cls`` does not know is a ``TypeError``, as a constructor's is."""
    known, tables = owners(cls), groups(cls)
    top = {key: value for key, value in settings.items() if key in tables or known.get(key, "?") is None}
    unknown = [key for key in settings if key not in known and key not in tables]
    if unknown:
        raise TypeError(f"{cls.__name__} got an unexpected keyword argument {unknown[0]!r}")
    defaults = {f.name: f.default_factory for f in fields(cls) if f.name in tables}
    for name in tables:
        changes = {key: value for key, value in settings.items() if known.get(key) == name and key != name}
        if changes or name not in top:
            top[name] = dataclasses.replace(top.get(name) or defaults[name](), **changes)
    return top
