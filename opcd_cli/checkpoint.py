"""Saving and restoring a run: the model in Hugging Face format, the training state, and the order of prompts.

* ``save_model``: a plain Hugging Face folder (safetensors, config, tokenizer, chat template) that
  ``transformers`` and vLLM load without this project, written under a temporary name and renamed;
* ``save_state`` / ``load_state``: what continues a run exactly (the trained weights at full precision, the
  optimiser, the scheduler, the step, the random states of Python, torch and the samplers, the metrics so
  far), in the run's ``state`` folder, replaced whole and never missing;
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

from .errors import OpcdError, first_line
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


STATE_DIR = "state"  # in the run directory: the latest training state, replaced whole
WEIGHTS_FILE = "trainable.safetensors"
STEP_FILE = "step.json"  # the step reached, readable without loading the state


def trainable_weights(model) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name (a tied matrix once): the master weights a resumed run needs.
    With LoRA these are the adapters; the frozen base model is reloaded from its source."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_state(run_dir: Path, *, step: int, model, optimizer, scheduler, metrics: list[dict],
               samplers: dict | None = None, extra: dict | None = None) -> Path:
    """Everything that continues the run exactly after ``step``, in ``run_dir/state``: the trained weights (at
    full precision), the optimiser, the scheduler, the random states of Python, torch and each sampler, the
    metrics so far. Written to a new folder that then replaces the old one, which is kept until the new one is
    complete: a kill at any instant leaves one complete state (``state``, or ``state.old`` between two renames).
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    target, old = run_dir / STATE_DIR, run_dir / f"{STATE_DIR}.old"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{STATE_DIR}."))
    try:
        os.chmod(tmp, DIR_MODE)
        save_file(trainable_weights(model), str(tmp / WEIGHTS_FILE))
        torch.save({
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "random": random_states(),
            "samplers": samplers or {},
            "metrics": metrics,
            "extra": extra or {},
        }, tmp / STATE_FILE)
        (tmp / STEP_FILE).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")
        for path in tmp.iterdir():
            os.chmod(path, FILE_MODE)
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def state_folder(run_dir: Path) -> Path | None:
    """The complete training state of a run, or None: ``state``, else ``state.old`` (a kill between renames)."""
    for name in (STATE_DIR, f"{STATE_DIR}.old"):
        folder = Path(run_dir) / name
        if all((folder / name).is_file() for name in (STATE_FILE, WEIGHTS_FILE, STEP_FILE)):
            return folder
    return None


def saved_step(run_dir: Path) -> int:
    """The step a run's saved training state reached; an error if it has none (checked before anything moves)."""
    folder = state_folder(run_dir)
    if folder is None:
        raise OpcdError(f"{run_dir} holds no training state (runs save one with --save-every, or when stopped by "
                        "Ctrl-C or SIGTERM); it cannot be resumed")
    try:
        return int(json.loads((folder / STEP_FILE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OpcdError(f"cannot read the training state in {folder}: {first_line(e)}") from None


def load_state(run_dir: Path, *, model, optimizer, scheduler) -> dict:
    """Restore the trained weights, the optimiser, the scheduler and the random states saved in ``run_dir``;
    returns the saved state (``step``, ``metrics``, ``samplers``, ``extra``)."""
    from safetensors.torch import load_file

    saved_step(run_dir)  # a clear error for a run without a complete state
    folder = state_folder(run_dir)
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        weights = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # a truncated or foreign file
        raise OpcdError(f"cannot read the training state in {folder}: {first_line(e)}") from None
    params = dict(model.named_parameters())
    missing = sorted(set(weights) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise OpcdError(f"the training state in {folder} does not fit this model (e.g. {missing[0]}); was it made "
                        "with other settings?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
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
