"""Environments a model plays turn by turn: the interface, the built-ins, and loading ``--env``.

An environment is any object with two methods (gymnasium's shape, in text)::

    reset(seed: int) -> str                         # the first observation
    step(reply: str) -> (observation, reward, done) # or (observation, reward, done, info)

``reply`` is the model's whole answer for the turn; the environment reads its move from it. ``info`` may say
``{"invalid": True}`` when the reply held no move the environment could read (a failed turn). A game is won
when its rewards add up to more than 0.

``--env NAME`` names a built-in (``BUILTIN``), ``textarena:ID`` (a TextArena single-player game, ``textarena.py``)
or ``package.module:Class`` (a class of the user's, built with the ``--env-options`` JSON object as keyword
arguments); each game gets its own instance.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..errors import OpcdError


class Environment(Protocol):
    def reset(self, seed: int) -> str:
        ...

    def step(self, reply: str) -> tuple:
        ...


@dataclass(frozen=True)
class Step:
    """What one turn gave back."""

    observation: str
    reward: float
    done: bool
    invalid: bool = False


BUILTIN = {"frozenlake": "opcd_cli.envs.frozenlake:FrozenLake", "doors": "opcd_cli.envs.doors:Doors"}


def environment_factory(spec: str, options: dict[str, Any] | None = None) -> Callable[[], Environment]:
    """A function that makes a fresh environment for one game; raises ``OpcdError`` on a name that is not
    found, a class that lacks the interface, or options it refuses."""
    options = dict(options or {})
    if spec.startswith("textarena:"):  # TextArena's single-player games (envs/textarena.py)
        from .textarena import factory_for

        cls, game = factory_for(spec.removeprefix("textarena:"), options)
        check_options(spec, cls, options)
        return game
    target = BUILTIN.get(spec.lower(), spec)
    if ":" not in target:
        raise OpcdError(f"--env {spec}: no such environment; give one of {', '.join(sorted(BUILTIN))}, "
                        "textarena:ID (a TextArena single-player game) or package.module:Class")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise OpcdError(f"--env {spec}: cannot import {module_name} ({e})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise OpcdError(f"--env {spec}: {module_name} has no {class_name}")
    if not all(callable(getattr(cls, name, None)) for name in ("reset", "step")):
        raise OpcdError(f"--env {spec}: {class_name} does not implement the environment interface "
                        "(reset(seed) -> observation, step(reply) -> (observation, reward, done))")

    check_options(spec, cls, options)

    def make() -> Environment:
        try:
            return cls(**options)
        except Exception as e:  # the user's own class: whatever it raises is its message
            raise OpcdError(f"--env {spec}: could not make the environment with options {options}: "
                            f"{type(e).__name__}: {e}") from None

    make()  # options it refuses are reported before any model loads
    return make


def check_options(spec: str, cls, options: dict[str, Any]) -> None:
    """``--env-options`` against the environment's constructor: every name one it takes, and a value of the type
    of the option's default (``{"slippery": "false"}`` would be true in Python)."""
    import inspect

    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a class whose signature cannot be read: its own errors speak
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    for key, value in options.items():
        if key not in parameters:
            names = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            raise OpcdError(f"--env {spec}: no option {key!r}; it takes {', '.join(names) or 'none'}")
        default = parameters[key].default
        if default is inspect.Parameter.empty or default is None:
            continue
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
        if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and type(default) is not bool)):
            expected = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[type(default)]
            raise OpcdError(f"--env {spec}: option {key} must be {expected} (like its default, {default!r}); got "
                            f"{value!r}")


def _call(name: str, where: str, method, argument):
    """``method(argument)``, the environment's own code: whatever it raises becomes a one-line error."""
    try:
        return method(argument)
    except OpcdError:
        raise
    except Exception as e:
        raise OpcdError(f"the environment {name} failed at {where}: {type(e).__name__}: {e}") from None


def reset(env: Environment, seed: int, name: str) -> str:
    observation = _call(name, f"reset(seed={seed})", env.reset, seed)
    if not isinstance(observation, str):
        raise OpcdError(f"the environment {name}'s reset returned {type(observation).__name__}, not the observation "
                        "text")
    return observation


def step(env: Environment, reply: str, name: str) -> Step:
    result = _call(name, "step", env.step, reply)
    if not isinstance(result, tuple) or len(result) not in (3, 4) or not isinstance(result[0], str):
        raise OpcdError(f"the environment {name}'s step returned {result!r:.80}; it must return (observation text, "
                        "reward, done) or (observation text, reward, done, info)")
    info = result[3] if len(result) == 4 and isinstance(result[3], dict) else {}
    reward, done = result[1], result[2]
    if isinstance(reward, (bool, str)) or not _is_number(reward):
        raise OpcdError(f"the environment {name}'s step returned the reward {reward!r:.40}; a reward must be a number")
    if isinstance(done, str) or not (isinstance(done, bool) or _is_number(done)):
        raise OpcdError(f"the environment {name}'s step returned done = {done!r:.40}; it must be true or false")
    return Step(result[0], float(reward), bool(done), bool(info.get("invalid", False)))


def _is_number(value) -> bool:
    """A finite real number of any kind (int, float, a numpy scalar)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return number == number and abs(number) != float("inf")
