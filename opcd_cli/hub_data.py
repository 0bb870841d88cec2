"""Datasets by name: ``hf:ORG/NAME`` (or ``hf:ORG/NAME:CONFIG``, or ``hf:FOLDER`` for a folder in a hub
dataset repository's layout), read by ``datasets.load_dataset`` as its own loaders read them.

A dataset in the local Hugging Face datasets cache reads offline (``HF_DATASETS_OFFLINE=1``, or a hub that cannot
be reached); one that is neither cached nor reachable is one line, as fast as the hub's connection check. The split
is ``--split`` (``--eval-split`` for evaluation rows), else the role's usual one (``train``; ``test`` or
``validation``), else a dataset's only split.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import OpcdError

PREFIX = "hf:"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
USUAL_SPLITS = {"train": ("train",), "eval": ("test", "validation")}


def is_hub_name(source: str | None) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


@dataclass(frozen=True)
class DatasetName:
    path: str  # a repository id (ORG/NAME) or a local folder
    config: str | None
    local: bool


def parse(source: str) -> DatasetName:
    """``hf:ORG/NAME[:CONFIG]`` or ``hf:FOLDER[:CONFIG]``; a malformed name is one line."""
    body = source.removeprefix(PREFIX)
    path, colon, config = body.partition(":")
    local = bool(path) and Path(path).expanduser().is_dir()
    if (not local and not REPO_ID.fullmatch(path)) or (colon and not re.fullmatch(r"[\w.-]+", config)):
        raise OpcdError(f"{source} is not a dataset name: write hf:ORG/NAME, hf:ORG/NAME:CONFIG or hf:FOLDER "
                        "(a folder in a hub dataset's layout)")
    return DatasetName(str(Path(path).expanduser()) if local else path, config or None, local)


def local_folder(source: str) -> str | None:
    """The folder an ``hf:`` name reads, when it names a local one (so no output is written into it)."""
    try:
        name = parse(source)
    except OpcdError:
        return None
    return name.path if name.local else None


def read(source: str, *, what: str, split: str | None, role: str = "train", split_flag: str = "--split",
         say: Callable[[str], None] | None = None) -> tuple[list[dict], str]:
    """The rows of one split of a dataset named ``hf:...``, as dicts, and the split's name."""
    name = parse(source)
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    with _offline_unless_reachable(name):
        try:
            splits = datasets.load_dataset(name.path, name.config)
        except ConnectionError:
            raise OpcdError(_not_cached(source)) from None
        except Exception as e:  # datasets raises many types: a missing config, a broken cache, an unreadable file
            raise OpcdError(f"cannot read {what} {source}: {' '.join(str(e).split()) or type(e).__name__}") from None
    chosen = choose_split(splits, split, role, f"{what} {source}", split_flag)
    if say is not None:
        say(f"{what} {source}: split {chosen} ({len(splits[chosen])} rows; splits {', '.join(splits)})")
    return splits[chosen].to_list(), chosen


def choose_split(splits, split: str | None, role: str, where: str, split_flag: str) -> str:
    """The split asked for, else the role's usual one, else the only one."""
    names = list(splits)
    if split is not None:
        if split not in names:
            raise OpcdError(f"{where} has no split {split!r}; its splits are {', '.join(names)}: give one with {split_flag}")
        return split
    usual = next((s for s in USUAL_SPLITS[role] if s in names), None)
    if usual is not None:
        return usual
    if len(names) == 1:
        return names[0]
    raise OpcdError(f"{where} has splits {', '.join(names)} and none is {' or '.join(USUAL_SPLITS[role])}: "
                    f"choose one with {split_flag}")


@contextmanager
def _offline_unless_reachable(name: DatasetName) -> Iterator[None]:
    """Reads from the cache alone (datasets' offline mode) when offline is asked for or the hub cannot be reached."""
    import datasets.config

    if name.local or datasets.config.HF_HUB_OFFLINE:
        yield
        return
    from huggingface_hub import constants

    from .models import hub_reachable

    if hub_reachable(constants.ENDPOINT):
        yield
        return
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = False


def _not_cached(source: str) -> str:
    import datasets.config

    why = "HF_DATASETS_OFFLINE is set" if _offline_asked() else "the hub cannot be reached"
    return (f"{source} is not in the Hugging Face datasets cache ({datasets.config.HF_DATASETS_CACHE}) and {why}; "
            f"load it once where the hub is reachable, or give a file or folder")


def _offline_asked() -> bool:
    import os

    from huggingface_hub import constants

    value = os.environ.get("HF_DATASETS_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.upper() in ("1", "ON", "YES", "TRUE")

