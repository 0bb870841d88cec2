"""Saving the student and the training state, and continuing a run from it (``--resume``): what is checked
before anything moves, and what is restored."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import distributed, lora, models
from ..checkpoint import check_state, load_state, save_model, save_state, saved_settings, saved_step, state_folder
from ..config import PERMISSIONS, RESUMABLE
from ..data import jsonl_text
from ..errors import OpcdError
from ..evaluate import EvalResult
from ..games import GameEvalResult
from ..outputs import RUN_MARKER, RunDir, write_text_atomic
from ..sampling import Sampler
from .records import Run, Training


def save_student(run: Run, folder: Path, final: bool = False) -> None:
    """The student in Hugging Face format at ``folder``. A LoRA student saves its adapter in PEFT's format
    (a checkpoint is the adapter alone; the final run has it in ``adapter/``, beside the merged model unless
    ``--no-merge``)."""
    cfg, dtype = run.cfg, models.resolve_dtype(run.cfg.loading.dtype)
    if not lora.is_lora(run.student):
        save_model(run.student, run.tokenizer, folder, dtype)
        return
    base = models.resolve(cfg.student)
    base = str(Path(base).resolve()) if Path(base).is_dir() else base  # loads from anywhere, without opcd
    lora.save_adapter(run.student, run.tokenizer, folder / "adapter" if final else folder, base)
    if final and cfg.lora.merge and distributed.is_sharded(run.student):  # merged as the weights are gathered
        main, base_model = distributed.world().main, run.student.get_base_model()
        first = {n.replace(".base_layer.", ".") for n, _ in base_model.named_parameters() if ".lora_" not in n}
        merged = {name: tensor.cpu() if main else None for name, tensor in lora.plain_weights(run.student)}
        save_model(base_model, run.tokenizer, folder, dtype, state={k: v for k, v in merged.items() if k in first})
    elif final and cfg.lora.merge:  # training is over: merge in place (no second copy of the adapted matrices)
        run.student = run.student.merge_and_unload()
        save_model(run.student, run.tokenizer, folder, dtype)


def moving_teacher(run: Run):
    """The teacher when its weights are the run's own state (``--teacher-kind ema``), else None."""
    return run.teacher if run.cfg.teacher_kind == "ema" else None


def save_training_state(run: Run, training: Training, sampler: Sampler, out: Path) -> None:
    save_state(out, step=training.step, model=run.student, optimizer=training.optimizer, scheduler=training.schedule,
               metrics=training.metrics, samplers={"student": sampler.state()},
               extra={"before": None if training.before is None else dataclasses.asdict(training.before)},
               teacher=moving_teacher(run), settings=run.cfg.to_dict())


def restore(run: Run, training: Training, sampler: Sampler, out: Path) -> None:
    """Continue from the run's saved state: weights, optimiser, schedule, random states, metrics, and the
    sampler following the restored weights."""
    state = load_state(out, model=run.student, optimizer=training.optimizer, scheduler=training.schedule,
                       teacher=moving_teacher(run))
    training.step, training.metrics = state["step"], list(state["metrics"])
    before = state["extra"].get("before")
    training.before = ((GameEvalResult if "success" in before else EvalResult)(**before)) if before else None
    sampler.set_state(state["samplers"].get("student", {}))
    sampler.update_weights(run.student)
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in training.metrics))


def saved_state_exists(folder: Path) -> bool:
    return folder.is_dir() and state_folder(folder) is not None


def check_resumable(out: RunDir, steps: int) -> None:
    """Before anything moves: the run to continue has a saved state, short of ``steps``; or, a run stopped after
    its last step's state was saved (killed while saving or scoring the final model), exactly at ``steps``: it
    is completed."""
    stopped = out.partial.is_dir()
    done = saved_step(out.partial if stopped else out.final)
    if done > steps or (done == steps and not stopped):
        least = f"of at least {done} to complete it" if stopped else f"above {done} to train it further"
        raise OpcdError(f"{out.final} has done {done} steps already; give --steps {least}")


def settings_edited(saved: dict | None, now: dict) -> tuple | None:
    """The first setting (key, then, now) that differs between a state's recorded settings and a resumed run's,
    leaving out what a resume may change and the permissions given anew; None when none does (or none were
    recorded)."""
    if saved is None:
        return None
    flat = lambda d: {k: v for k, v in d.items() if not isinstance(v, dict) or k in ("env_options",
                      "ood_env_options")} | {k: v for nested in ("sampling", "loading") for k, v in d.get(nested, {}).items()}
    free = set(RESUMABLE) | set(PERMISSIONS) | {"output_dir", "overwrite"}
    then, current = flat(saved), flat(now)
    return next(((k, then[k], current[k]) for k in sorted(then.keys() & current.keys())  # a setting added since
                 if k not in free and then[k] != current[k]), None)  # is at its default, one removed is gone


def input_records(run: Run) -> dict[str, str]:
    """What the run's ``data/`` folder holds: each file's name and its text (the rows as JSONL, the context)."""
    records = {f"{name}.jsonl": jsonl_text(rows) for name, rows in
               (("train", run.examples), ("test", run.eval_examples), ("ood", run.ood_examples)) if rows}
    if run.context is not None:
        records["context.txt"] = run.context + "\n"
    return records


def check_resume(run: Run) -> None:
    """A run to resume: its saved state complete and fitting the models, its settings those its state recorded,
    and the inputs it reads now (``--data``, ``--context``, the evaluation rows) the ones it recorded in
    ``data/`` when it started."""
    source = run.out.partial if run.out.partial.is_dir() else run.out.final
    check_state(source, model=run.student, teacher=moving_teacher(run))
    cfg = run.cfg
    edited = settings_edited(saved_settings(source), cfg.to_dict())
    if edited:
        key, saved, now = edited
        raise OpcdError(f"{source / RUN_MARKER} was edited since its training state was saved ({key}: {saved!r} then, "
                        f"{now!r} now); a resume continues a run with its own settings (only flags change them): put "
                        "the file back as it was")
    given = {"train.jsonl": cfg.data, "test.jsonl": cfg.evaluation.eval_data, "ood.jsonl": cfg.evaluation.ood_data,
             "context.txt": cfg.context}
    for name, text in input_records(run).items():
        recorded = source / "data" / name
        if recorded.is_file() and recorded.read_text(encoding="utf-8") != text:
            raise OpcdError(f"{given[name]} has changed since {run.out.final.name} started (it no longer matches "
                            f"{recorded}); a resumed run reads what it started with: put the original back, or "
                            "start a new run")


def write_inputs(run: Run, out: Path) -> dict[str, str]:
    """The rows and the context the run used, in its ``data/`` folder (written by rank 0); returns their paths."""
    paths = {}
    for file, text in input_records(run).items():
        if distributed.world().main:
            write_text_atomic(out / "data" / file, text)
        paths[file.split(".")[0]] = str(run.out.final / "data" / file)
    return paths
