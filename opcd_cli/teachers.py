"""What the teacher is, step by step (``--teacher-kind``).

* ``frozen`` (the default, the paper's): the student's initial weights (or ``--teacher``), never changed.
* ``ema``: an exponential moving average of the student, ``teacher <- decay * teacher + (1 - decay) * student``
  after every optimiser step (``--ema-decay``), starting at the student's initial weights: a target that moves
  slowly (TRL offers it). Its weights are float32, as the student's master weights are, and are saved with the
  training state so that a resumed run goes on identically.
* ``live``: the current student itself, reading the context, without gradient (self-distillation).

A moving teacher (``ema``, ``live``) makes the teacher's cached prefix stale after each step: ``after_step``
drops it, and the next micro-batch computes it again.
"""

from __future__ import annotations

import torch

def moves(kind: str) -> bool:
    """Whether the teacher changes during training."""
    return kind != "frozen"


def _resharded(model: torch.nn.Module) -> None:
    """Under FSDP2 the root module keeps its parameters gathered after a forward without backward (the teacher's):
    shard every FSDP module again, so that each parameter is this rank's shard."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """``teacher <- decay * teacher + (1 - decay) * student``, parameter by parameter (sharded the same way under
    FSDP, so each rank updates its own shards)."""
    _resharded(teacher)
    _resharded(student)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - decay)


def after_step(kind: str, teacher: torch.nn.Module, student: torch.nn.Module, decay: float, prefix) -> None:
    """What the teacher does once the student has taken a step: follow it (``ema``), and forget a cached prefix
    made with the weights before it (``ema``, ``live``)."""
    if kind == "ema":
        ema_update(teacher, student, decay)
    if moves(kind) and prefix is not None:
        prefix.forget()
