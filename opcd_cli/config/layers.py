"""Building a configuration from layers, later ones winning: dataclass defaults < the built-in toy recipe (when
no model is given anywhere) < ``--recipe`` < flags; and the configuration of a run to continue (``--resume``).

Every layer is flat, as flags and recipe keys name settings (``topk``, ``temperature``); a recipe may also put
a group's keys in its table (``[sampling]``, ``[loss]``). Each key goes to the group that holds it.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import OpcdError
from .checks import check_value, hints
from .commands import EvalConfig, ExtractConfig
from .distill import DistillConfig, flat_defaults
from .names import groups, hint, owners, route


def parse_json_object(text: str | None, flag: str = "--chat-template-kwargs",
                      example: str = '{"enable_thinking": false}') -> dict | None:
    """A flag's JSON object of keyword arguments: ``--chat-template-kwargs`` (for every chat template render)
    unless another ``flag`` is named."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise OpcdError(f"{flag} must be a JSON object such as '{example}'; {text!r} is not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise OpcdError(f"{flag} must be a JSON object such as '{example}'; got {text!r}")
    return value


def read_recipe(path: str | Path, cls=None) -> dict[str, Any]:
    """A recipe's settings as a flat dict: a TOML file, or the name of a packaged recipe (``toy-codes``).

    Tables of a group's keys (``[sampling]``, ``[loading]``, ``[loss]``, ...) are allowed; keys are checked
    against ``cls`` (``DistillConfig`` by default).
    """
    from ..sources import builtin_recipes, recipe_file

    file = Path(path)
    if not file.is_file():
        builtin = recipe_file(str(path)) if not any(sep in str(path) for sep in "/\\") else None
        if builtin is None:
            raise OpcdError(f"recipe file {path} does not exist (built-in recipes: {', '.join(builtin_recipes())})")
        file = builtin
    try:
        with file.open("rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OpcdError(f"recipe file {path} is not valid TOML: {e}") from None
    return flatten_settings(data, source=str(path), cls=cls or DistillConfig)


def flatten_settings(data: dict[str, Any], source: str = "settings", cls=None) -> dict[str, Any]:
    """Turn ``{"sampling": {"temperature": 0.6}}`` into ``{"temperature": 0.6}`` and reject unknown keys."""
    cls = cls or DistillConfig
    known, tables = owners(cls), groups(cls)
    command = {ExtractConfig: "extract", EvalConfig: "eval"}.get(cls, "distill")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key in tables and isinstance(value, dict):
            names = {f.name for f in fields(tables[key])}
            for sub, subvalue in value.items():
                sub = sub.replace("-", "_")
                if sub not in names:
                    raise OpcdError(f"{source}: unknown setting {key}.{sub}; known: {', '.join(sorted(names))}")
                check_value(f"{key}.{sub}", subvalue, hints(tables[key])[sub], where=f"{source}: ")
                flat[sub] = subvalue
        elif key in known and key not in tables:
            value = tuple(value) if isinstance(value, list) and hint(cls, key) == tuple[str, ...] else value
            check_value(key, value, hint(cls, key), where=f"{source}: ")
            flat[key] = value
        else:
            raise OpcdError(f"{source}: unknown setting {key!r}; see `opcd {command} --help` for the names")
    return flat


def build_config(cls, *layers: dict[str, Any]):
    """Merge flat setting dicts (later wins, None means "not given") into a validated ``cls``: each key to the
    group that holds it, each group from the command's own defaults (extract samples at temperature 1, eval
    greedily). Every field of ``cls`` needs a default."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k.replace("-", "_"): v for k, v in layer.items() if v is not None})
    try:
        return cls(**route(cls, merged))
    except TypeError as e:  # a value of the wrong type, or a setting this command does not take
        raise OpcdError(f"bad setting: {e}") from None


def build_distill_config(*layers: dict[str, Any]) -> DistillConfig:
    return build_config(DistillConfig, *layers)


def build_extract_config(*layers: dict[str, Any]) -> ExtractConfig:
    return build_config(ExtractConfig, *layers)


RESUMABLE = ("steps", "save_every", "show_prompts", "teacher_sharding", "gradient_checkpointing",
             "teacher_prefix_cache", "micro_batch_tokens", "min_topk_mass", "stop_on_escape")  # what a resumed run
# may change: train further, keep checkpoints, how it runs, what is printed and watched
PERMISSIONS = ("trust_remote_code", "allow_bin_weights", "report_to")  # what a run may do beyond reading its
# inputs (run a model's code, unpickle weights, send metrics away): given on the command line of every
# invocation, never read from a run folder, which is data that travels


def _flag_list(keys) -> str:
    flags = ["--" + k.replace("_", "-") for k in keys]
    return ", ".join(flags[:-1]) + f" and {flags[-1]}" if len(flags) > 1 else flags[0]


def is_python_env(env: str | None) -> bool:
    """Whether ``--env`` names the user's own class (``package.module:Class``), not a built-in game."""
    return env is not None and ":" in env


@dataclass(frozen=True)
class Resumed:
    """A run to continue: its configuration (its own settings, the permissions of this command line) and the
    flags of the permissions its folder records that this command line does not give (so not used)."""

    config: DistillConfig
    not_given: tuple[str, ...]  # e.g. ("--trust-remote-code", "--report-to wandb")


def _saved_settings(run: str, folder: Path) -> dict[str, Any]:
    """The run's own settings, from its ``opcd_config.json`` (flat, as every version of opcd writes it)."""
    try:
        saved = json.loads((folder / "opcd_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OpcdError(f"--resume {run}: cannot read its opcd_config.json ({type(e).__name__}); is it an opcd run?") from None
    if not isinstance(saved, dict):
        raise OpcdError(f"--resume {run}: its opcd_config.json holds {type(saved).__name__}, not the run's settings; "
                        "is it an opcd run?")
    return flatten_settings(saved, source=str(folder / "opcd_config.json"))


def resume_config(run: str, flags: dict[str, Any]) -> Resumed:
    """The configuration of the run to continue (its ``.partial`` folder, or a finished run), with the settings of
    ``RESUMABLE`` and ``PERMISSIONS`` from ``flags``; any other flag that differs from the run's own setting is
    an error. Nothing read from the run folder turns a permission on: those come from ``flags`` alone, and a
    game class of the user's (``package.module:Class``, code) runs only when ``--env`` names it again."""
    folder = Path(run)
    if not folder.is_dir():
        raise OpcdError(f"--resume {run}: no such run folder")
    final = folder.with_name(folder.name.removesuffix(".partial"))
    settings = _saved_settings(run, folder)
    given = {key.replace("-", "_"): value for key, value in flags.items() if value is not None}
    differing = sorted(key for key, value in given.items()
                       if key not in RESUMABLE + PERMISSIONS and key not in ("output_dir", "overwrite")
                       and settings.get(key) != value)
    if differing:
        raise OpcdError(f"--resume continues {run} with its own settings; these flags differ from them: "
                        f"{', '.join('--' + k.replace('_', '-') for k in differing)} (only {_flag_list(RESUMABLE)} "
                        f"may change; {_flag_list(PERMISSIONS)} are given anew each time)")
    if given.get("overwrite"):
        raise OpcdError("--resume continues a run where it stopped; it cannot be combined with --overwrite")
    if given.get("output_dir") is not None and Path(given["output_dir"]).expanduser().resolve() != final.resolve():
        raise OpcdError(f"--resume continues {run} in its own folder ({final}); drop --output-dir")
    if is_python_env(settings.get("env")) and given.get("env") != settings["env"]:
        raise OpcdError(f"{run} plays --env {settings['env']}, a class of your own (Python code); a run folder never "
                        f"runs code by itself: give --env {settings['env']} again to resume it")
    defaults = flat_defaults(DistillConfig)
    not_given = tuple(_flag_list([key]) + ("" if isinstance(defaults[key], bool) else f" {settings[key]}")
                      for key in PERMISSIONS if key not in given and settings.get(key, defaults[key]) != defaults[key])
    changes = {key: given[key] for key in RESUMABLE if key in given}
    permissions = {key: given.get(key, defaults[key]) for key in PERMISSIONS}
    return Resumed(build_distill_config(settings, changes, permissions, {"output_dir": str(final), "overwrite": False}),
                   not_given)
