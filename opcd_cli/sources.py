"""Built-in names, resolved in one place: the toy world's models, data, texts and recipes.

* ``toy:small``, ``toy:large``: the shipped toy models (folders);
* ``toy:TASK/SPLIT``, SPLIT one of train, val, test, ood, or extract-train (the problems ``opcd extract``
  attempts): rows of the toy world's task TASK (``codes``, ``shift`` or ``recall``);
* ``toy:TASK/context``: the task's context (``toy:game/ood-context``: the game's out of distribution);
  ``toy:extraction-template``: the prompt the toy models learned to
  write experience items from;
* recipes ``toy-codes``, ``toy-shift``, ``toy-recall`` (``opcd distill``) and ``toy-codes-extract`` (``opcd extract``):
  packaged TOML files in ``opcd_cli/toy/recipes/`` (twins of those in the repository's ``recipes/``).

Every other name is a path or a hub id, which the loaders in ``data.py`` and ``models.py`` handle.
"""

from __future__ import annotations

from pathlib import Path

from .errors import OpcdError

PREFIX = "toy:"
RECIPES = Path(__file__).parent / "toy" / "recipes"
SPLITS = ("train", "val", "test", "ood", "extract-train")


def is_builtin(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def model_folder(name: str) -> str:
    """The folder of a built-in model (``toy:small``)."""
    from .toy.world import model_path

    return str(model_path(name.removeprefix(PREFIX)))


def _task_and_part(name: str) -> tuple[str, str]:
    from .toy.world import TOY_TASKS

    task, _, part = name.removeprefix(PREFIX).partition("/")
    if task not in TOY_TASKS or not part:
        raise OpcdError(f"unknown built-in name {name!r}; built-in data are toy:TASK/SPLIT with TASK one of "
                        f"{', '.join(TOY_TASKS)} and SPLIT one of {', '.join(SPLITS)}")
    return task, part


def rows(name: str) -> list[dict]:
    """The rows of a built-in data name (``toy:codes/test``)."""
    from .toy import world

    task, split = _task_and_part(name)
    if split not in SPLITS:
        raise OpcdError(f"unknown built-in split {name!r}; choose one of {', '.join(SPLITS)}")
    splits = world.splits(task)
    if split == "extract-train":
        return splits.train[: world.EXTRACT_TRAIN]
    return getattr(splits, split)


def text(name: str) -> str:
    """A built-in text: a task's context (``toy:codes/context``) or ``toy:extraction-template``."""
    from .toy import tasks, world

    if name == PREFIX + "extraction-template":
        return tasks.EXTRACTION_TEMPLATE
    task, part = _task_and_part(name)
    if task == "game" and part in ("context", "ood-context"):
        return world.game_context(ood=part == "ood-context")
    if part != "context":
        raise OpcdError(f"unknown built-in text {name!r}; use toy:TASK/context, toy:game/ood-context or "
                        "toy:extraction-template")
    return world.splits(task).context


def recipe_file(name: str) -> Path | None:
    """The packaged recipe called ``name`` (``toy-codes``), or None."""
    path = RECIPES / f"{name.removesuffix('.toml')}.toml"
    return path if path.is_file() else None


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.toml"))
