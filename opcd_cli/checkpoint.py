"""Saving and restoring a run: the model in Hugging Face format, the training state, and the order of prompts.

* ``save_model``: a plain Hugging Face folder (safetensors, config, tokenizer, chat template) that
  ``transformers`` and vLLM load without this project, written under a temporary name and renamed;
* ``save_state`` / ``load_state``: what continues a run exactly (optimiser, scheduler, step, the random states
  of Python and torch, the metrics so far), one file replaced atomically;
* ``step_prompts``: the prompts of an optimiser step, a pure function of (number of prompts, seed, step): a
  fresh shuffle each epoch, so a run that resumes at step s draws what it would have drawn.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from .errors import OpcdError
from .outputs import DIR_MODE, FILE_MODE

STATE_FILE = "training_state.pt"


def save_model(model, tokenizer, folder: Path, dtype: torch.dtype) -> None:
    """``model`` in Hugging Face format at ``folder``, its weights cast to ``dtype`` (master weights stay as they
    are); the folder appears whole or not at all."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        os.chmod(tmp, DIR_MODE)
        state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if hasattr(model.config, "dtype"):  # record the dtype the weights were saved in, not the training one
            config = json.loads((tmp / "config.json").read_text())
            config["dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            _move_into(tmp, folder)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into(tmp: Path, folder: Path) -> None:
    """Put the files of ``tmp`` into the existing ``folder`` (a run directory that holds other files too)."""
    for item in tmp.iterdir():
        target = folder / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


def random_states() -> dict:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(folder: Path, *, step: int, optimizer, scheduler, metrics: list[dict], extra: dict | None = None) -> Path:
    """The training state after ``step`` in ``folder/training_state.pt``, replacing any earlier one atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "random": random_states(),
        "metrics": metrics,
        "extra": extra or {},
    }
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{STATE_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, folder / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / STATE_FILE


def load_state(folder: Path, *, optimizer, scheduler) -> dict:
    """Restore the optimiser, the scheduler and the random states saved in ``folder``; returns the saved state
    (``step``, ``metrics``, ``extra``)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise OpcdError(f"{folder} holds no training state ({STATE_FILE}); it cannot be resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise OpcdError(f"cannot read the training state {path}: {e}") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_random_states(state["random"])
    return state


@lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The prompt order of ``epoch``: the (epoch + 1)-th shuffle of ``range(n)`` by ``random.Random(seed)``."""
    rng = random.Random(seed)
    for _ in range(epoch + 1):
        order = list(range(n))
        rng.shuffle(order)
    return tuple(order)


def step_prompts(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """The indices of the prompts of optimiser step ``step`` (from 1): the next ``per_step`` of an endless
    sequence of shuffled epochs."""
    start = (step - 1) * per_step
    return [epoch_order(n, seed, i // n)[i % n] for i in range(start, start + per_step)]
