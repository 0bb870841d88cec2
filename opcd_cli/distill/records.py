"""The records a run hands from phase to phase: the loaded models, the prepared run, what training changes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import DistillConfig
from ..data import Example
from ..escape import Escape
from ..evaluate import EvalResult
from ..forward import TeacherPrefix
from ..games import GameSetup
from ..loss import DistillLoss
from ..micro_batches import Packer
from ..outputs import RunDir
from ..prompts import ChatRenderer, Views
from ..rollouts import Rollouts


@dataclass(frozen=True)
class Models:
    """The student and the teacher, loaded, with their tokenizers and chat renderers and the vocabulary they
    share (the teacher may be the student itself, its adapters off, or a copy of it)."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object  # the student's
    teacher_name: str  # --teacher, or the student's name when the teacher is made from it
    vocab: int
    student_renderer: ChatRenderer
    teacher_renderer: ChatRenderer


@dataclass
class Run:
    """Everything a distillation run needs, loaded and checked (``setup.prepare`` builds it)."""

    cfg: DistillConfig
    out: RunDir
    examples: list[Example]  # the training rows (none with --env)
    views: list[Views]  # each row's prompt as the student and the teacher read it (with --env: the first turn)
    context: str | None
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    student_renderer: ChatRenderer
    teacher_renderer: ChatRenderer
    loss: DistillLoss
    stop_ids: set[int]
    packer: Packer  # makes a micro-batch into each pass's inputs: padded rows or one packed row
    trainable_parameters: int
    teacher_prefix: TeacherPrefix | None = None  # what every teacher prompt starts with, read once
    eval_examples: list[Example] | None = None
    ood_examples: list[Example] | None = None
    rollouts: Rollouts | None = None  # off-policy: saved teacher rollouts, when --rollouts holds them
    games: GameSetup | None = None  # --env: games played turn by turn instead of dataset rows


@dataclass
class Training:
    """What the loop changes: the optimiser and its schedule, the step reached, the metrics so far, and the
    evaluation before training (kept in the saved state, so that a resumed run need not redo it)."""

    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    metrics: list[dict] = field(default_factory=list)
    before: EvalResult | None = None
    escape: Escape | None = None  # the step where the student's top-k mass fell below --min-topk-mass
