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

from .errors import OpcdError, first_line, write_failure
from .outputs import DIR_MODE, FILE_MODE

STATE_FILE = "training_state.pt"


def save_model(model, tokenizer, folder: Path, dtype: torch.dtype, state: dict | None = None) -> None:
    """``model`` in Hugging Face format at ``folder``, its weights cast to ``dtype`` (master weights stay as they
    are); the folder appears whole or not at all. A sharded model is gathered and rank 0 writes it. ``state``
    replaces the model's own state dict (rank 0's is written)."""
    from .distributed import full_state_dict, plain_class_name, world

    whole = full_state_dict(model) if state is None else state  # every rank takes part when the model is sharded
    if not world().main:
        return
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        os.chmod(tmp, DIR_MODE)
        state = {k: v.detach().to(dtype) for k, v in whole.items()}
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        config["architectures"] = [plain_class_name(model)]  # not the class FSDP wraps it in
        if hasattr(model.config, "dtype"):  # record the dtype the weights were saved in, not the training one
            config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            _move_into(tmp, folder)
        else:
            tmp.rename(folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = write_failure(e, f"the model in {folder}")
        if full is not None:
            raise full from None
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
SHARDED_DIR = "sharded"  # several processes: weights and optimiser by torch.distributed.checkpoint instead
TEACHER_FILE = "teacher.safetensors"  # a teacher that moves with the student (--teacher-kind ema), one process
STEP_FILE = "step.json"  # the step reached, readable without loading the state


def trainable_weights(model) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name (a tied matrix once): the master weights a resumed run needs.
    With LoRA these are the adapters; the frozen base model is reloaded from its source."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_state(run_dir: Path, *, step: int, model, optimizer, scheduler, metrics: list[dict],
               samplers: dict | None = None, extra: dict | None = None, teacher=None,
               settings: dict | None = None) -> Path:
    """Everything that continues the run exactly after ``step``, in ``run_dir/state``: the trained weights (at
    full precision), the optimiser, the scheduler, the random states of Python, torch and each sampler, the
    metrics so far; and a ``teacher`` that moves with the student (an average of it), whole; ``settings`` (the
    run's, which a resume checks its config file against) beside the step in ``step.json``. Written to a new
    folder that then replaces the old one, which is kept until the new one is complete: a kill at any instant
    leaves one complete state (``state``, or ``state.old`` between two renames).

    With several processes every rank writes its shards of the weights and the optimiser with
    ``torch.distributed.checkpoint`` (``sharded/``, readable at any world size) and rank 0 the rest.
    """
    from . import distributed

    world = distributed.world()
    run_dir = Path(run_dir)
    target = run_dir / STATE_DIR
    tmp = Path(distributed.broadcast_object(
        tempfile.mkdtemp(dir=run_dir, prefix=f".{STATE_DIR}.") if world.main else None))
    randoms = distributed.gather_objects(random_states())  # each rank's own
    try:
        if world.active:
            _save_shards(tmp / SHARDED_DIR, model, optimizer, teacher)
        if world.main:
            _write_state(tmp, model if not world.active else None, teacher if not world.active else None, {
                "step": step,
                "optimizer": None if world.active else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "random": randoms[0],
                "random_by_rank": randoms,
                "samplers": samplers or {},
                "metrics": metrics,
                "extra": extra or {},
            }, {"step": step, "settings": settings})
            _put_in_place(tmp, target)
    except BaseException as e:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        full = write_failure(e, f"the training state in {run_dir} (the previous one is kept)")
        if full is not None:
            raise full from None
        raise
    distributed.barrier()  # no rank goes on (or saves again) before the state is in place
    return target


def _save_shards(folder: Path, model, optimizer, teacher) -> None:
    """Every rank's shards of the weights and the optimiser (and of a moving teacher), written together with
    ``torch.distributed.checkpoint``: readable at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    weights, optimizer_state = get_state_dict(model, optimizer)
    shards = {"model": weights, "optimizer": optimizer_state}
    if teacher is not None:
        shards["teacher"] = get_model_state_dict(teacher)
    dcp.save(shards, checkpoint_id=str(folder))


def _write_state(tmp: Path, model, teacher, state: dict, step: dict) -> None:
    """Rank 0's files in the new state folder ``tmp``: the trained weights and a moving teacher's (one process;
    several write shards), the rest of the ``state``, and ``step`` as ``step.json``; owner-only modes."""
    from safetensors.torch import save_file

    os.chmod(tmp, DIR_MODE)
    if model is not None:
        save_file(trainable_weights(model), str(tmp / WEIGHTS_FILE))
    if teacher is not None:
        save_file({n: p.detach().contiguous() for n, p in teacher.named_parameters()}, str(tmp / TEACHER_FILE))
    torch.save(state, tmp / STATE_FILE)
    (tmp / STEP_FILE).write_text(json.dumps(step) + "\n", encoding="utf-8")
    for path in tmp.rglob("*"):
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def _put_in_place(tmp: Path, target: Path) -> None:
    """The complete new state replaces the old one, which is kept (as ``state.old``) until the new one is in
    place: a kill at any instant leaves one complete state."""
    old = target.with_name(f"{target.name}.old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def state_folder(run_dir: Path) -> Path | None:
    """The complete training state of a run, or None: ``state``, else ``state.old`` (a kill between renames)."""
    for name in (STATE_DIR, f"{STATE_DIR}.old"):
        folder = Path(run_dir) / name
        if all((folder / name).is_file() for name in (STATE_FILE, STEP_FILE)) and (
                (folder / WEIGHTS_FILE).is_file() or (folder / SHARDED_DIR / ".metadata").is_file()):
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


def check_state(run_dir: Path, *, model, teacher=None) -> None:
    """Before a resumed run moves anything: its saved state is complete and fits ``model`` (and a moving
    ``teacher``), read without loading the tensors: the step, the state file's zip directory (a truncated file
    has none), the weights' names from their headers."""
    import zipfile

    from safetensors import safe_open

    saved_step(run_dir)
    folder = state_folder(run_dir)
    try:
        with zipfile.ZipFile(folder / STATE_FILE) as archive:
            archive.namelist()
        if (folder / SHARDED_DIR).is_dir():
            import torch.distributed.checkpoint as dcp

            keys = dcp.FileSystemReader(str(folder / SHARDED_DIR)).read_metadata().state_dict_metadata
            _check_names(folder, {k.removeprefix("model.") for k in keys if k.startswith("model.")}, model, exact=False)
            if teacher is not None and not any(k.startswith("teacher.") for k in keys):
                raise _no_teacher(folder)
            return
        with safe_open(str(folder / WEIGHTS_FILE), "pt") as weights:
            _check_names(folder, set(weights.keys()), model)
        if teacher is not None:
            if not (folder / TEACHER_FILE).is_file():
                raise _no_teacher(folder)
            with safe_open(str(folder / TEACHER_FILE), "pt") as weights:
                weights.keys()
    except OpcdError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise OpcdError(f"cannot read the training state in {folder}: {first_line(e)}; the run is left as it "
                        "was") from None


def saved_settings(run_dir: Path) -> dict | None:
    """The run's settings as its training state recorded them (None for a state saved before they were)."""
    try:
        settings = json.loads((state_folder(run_dir) / STEP_FILE).read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def load_state(run_dir: Path, *, model, optimizer, scheduler, teacher=None) -> dict:
    """Restore the trained weights, the optimiser, the scheduler and the random states saved in ``run_dir``;
    returns the saved state (``step``, ``metrics``, ``samplers``, ``extra``). A state saved by several processes
    loads at any world size, one process included; one saved by one process loads into several too."""
    from . import distributed

    saved_step(run_dir)  # a clear error for a run without a complete state
    folder = state_folder(run_dir)
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        if (folder / SHARDED_DIR).is_dir():
            _load_sharded(folder / SHARDED_DIR, model, optimizer, teacher)
        else:
            _load_whole(folder, state, model, optimizer)
            if teacher is not None:
                _load_teacher(folder, teacher)
    except OpcdError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise OpcdError(f"cannot read the training state in {folder}: {first_line(e)}") from None
    scheduler.load_state_dict(state["scheduler"])
    world, randoms = distributed.world(), state.get("random_by_rank") or [state["random"]]
    if len(randoms) == world.size:
        set_random_states(randoms[world.rank])
    else:  # another world size: the sampling streams cannot continue as they were; each rank starts afresh
        set_random_states(randoms[0])
        torch.manual_seed(torch.initial_seed() + 1_000_003 * world.rank + state["step"])
    return state


def _check_names(folder: Path, saved, model, exact: bool = True) -> None:
    """The saved weights are the model's trained parameters (``exact``), or include them (a sharded state also
    holds a tied matrix under its second name)."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(saved) ^ expected if exact else expected - set(saved))
    if missing:
        raise OpcdError(f"the training state in {folder} does not fit this model (e.g. {missing[0]}); was it made "
                        "with other settings?")


def _load_whole(folder: Path, state: dict, model, optimizer) -> None:
    """A state saved by one process: ``trainable.safetensors`` and the optimiser's own state dict."""
    from safetensors.torch import load_file

    from .distributed import is_sharded

    weights = load_file(str(folder / WEIGHTS_FILE))
    _check_names(folder, weights, model)
    if not is_sharded(model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=whole)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimiser's order
    saved = state["optimizer"]
    by_name = {"state": {names[i]: value for i, value in saved["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=whole)


def _no_teacher(folder: Path) -> OpcdError:
    return OpcdError(f"the training state in {folder} holds no teacher; was it made with another --teacher-kind?")


def _load_teacher(folder: Path, teacher) -> None:
    """A moving teacher saved by one process, into a teacher sharded or not."""
    from safetensors.torch import load_file

    from .distributed import is_sharded

    if not (folder / TEACHER_FILE).is_file():
        raise _no_teacher(folder)
    weights = load_file(str(folder / TEACHER_FILE))
    if is_sharded(teacher):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(teacher, weights, options=StateDictOptions(full_state_dict=True, strict=True))
        return
    teacher.load_state_dict(weights, strict=False)  # a tied matrix is saved under one of its names


def _load_sharded(folder: Path, model, optimizer, teacher=None) -> None:
    """A state saved by several processes, resharded to this world (one process included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

    weights, optimizer_state = get_state_dict(model, optimizer)
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    _check_names(folder.parent, {k.removeprefix("model.") for k in metadata.state_dict_metadata
                                 if k.startswith("model.")}, model, exact=False)
    shards = {"model": weights, "optimizer": optimizer_state}
    if teacher is not None:
        if not any(k.startswith("teacher.") for k in metadata.state_dict_metadata):
            raise _no_teacher(folder.parent)
        shards["teacher"] = get_model_state_dict(teacher)
    dcp.load(shards, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state)
    if teacher is not None:
        set_model_state_dict(teacher, shards["teacher"])


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
