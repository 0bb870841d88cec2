"""What the teacher does before the student trains: a separate teacher's evaluation with the context, and,
off-policy, its rollouts (every prompt answered with the context, with its top-k saved for the loss), written
once and reused from ``--rollouts``."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed, models
from .. import rollouts as rollout_store
from ..config import DistillConfig
from ..errors import OpcdError
from ..ui import UI
from .evals import evaluate_teacher
from .records import Run
from .samplers import open_samplers


def rollouts_fingerprint(cfg: DistillConfig, context, examples, views) -> dict:
    return rollout_store.fingerprint(cfg.teacher or cfg.student, context, examples, [v.teacher_ids for v in views],
                                     cfg.loss.topk, cfg.sampling, cfg.seed)


def reusable_rollouts(cfg: DistillConfig, context, examples, views, vocab: int) -> rollout_store.Rollouts | None:
    """Off-policy, the teacher rollouts ``--rollouts`` holds (checked against this run), or None when it names a
    folder to write them to."""
    if cfg.on_policy or not cfg.rollouts:
        return None
    folder = Path(cfg.rollouts)
    if (folder / rollout_store.META).is_file():
        return rollout_store.load(folder, rollouts_fingerprint(cfg, context, examples, views), vocab)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OpcdError(f"--rollouts {folder} exists and holds no rollouts; give an empty or new folder")
    return None


def rollouts_folder(cfg: DistillConfig, out: Path) -> Path:
    """Where a run's teacher rollouts are kept: ``--rollouts``, else the run's own ``rollouts/``."""
    return Path(cfg.rollouts) if cfg.rollouts else out / "rollouts"


def saved_rollouts(run: Run, out: Path):
    """Off-policy, a resumed run's teacher rollouts: those it saved (or ``--rollouts``, already read by
    ``setup.prepare``), else None."""
    cfg = run.cfg
    folder = rollouts_folder(cfg, out)
    if run.rollouts is not None or cfg.on_policy or not (folder / rollout_store.META).is_file():
        return run.rollouts
    return rollout_store.load(folder, rollouts_fingerprint(cfg, run.context, run.examples, run.views), run.loss.vocab)


def make_rollouts(run: Run, ui: UI, out: Path, sampler) -> rollout_store.Rollouts:
    """Off-policy: the teacher answers every prompt with the context (through ``sampler``, which serves the
    teacher's weights for the whole world); saved to ``--rollouts`` (or the run) for reuse."""
    cfg = run.cfg
    prompts = [v.teacher_ids for v in run.views]
    torch.manual_seed(cfg.seed)
    with ui.progress(), models.autocast(cfg.loading.dtype):
        advance = ui.task("teacher rollouts", len(prompts))
        made = rollout_store.generate(run.teacher, sampler, prompts, cfg.sampling, cfg.loss.topk, run.loss.vocab,
                                      models.pad_id(run.tokenizer), cfg.optim.batch_size,
                                      rollouts_fingerprint(cfg, run.context, run.examples, run.views), advance)
    if distributed.world().main:
        rollout_store.save(rollouts_folder(cfg, out), made)
    distributed.barrier()
    return made


def teacher_work(run: Run, ui: UI, out: Path):
    """What a separate teacher (``--teacher``) does before the student's sampler starts: its evaluation with the
    context and, off-policy, its rollouts; their engine is closed after. Returns (the teacher's accuracy or
    None, the rollouts: those written, else those ``--rollouts`` held, else None)."""
    samplers = open_samplers(run, "teacher", run.rollouts)
    try:
        score = evaluate_teacher(run, ui, samplers.evaluation) if samplers.evaluation else None
        rollouts = make_rollouts(run, ui, out, samplers.rollouts) if samplers.rollouts else run.rollouts
    finally:
        samplers.close()
    return score, rollouts
