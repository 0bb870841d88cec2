"""Experiment trackers (``--report-to``): the per-step metrics of ``metrics.jsonl`` sent, as they are logged, to
TensorBoard or Weights & Biases through their own libraries, the way TRL users expect.

* ``tensorboard``: event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN``); needs ``tensorboard``.
* ``wandb``: a run in ``RUN/wandb``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it
  later); needs ``wandb``.

Both are optional extras (``pip install 'opcd[tensorboard]'``, ``'opcd[wandb]'``); a missing one is a one-line
error before any model loads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol

from .errors import OpcdError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
LOGGED = ("loss", "distill_loss", "consistency_loss", "anchor_loss", "topk_mass", "student_entropy", "teacher_entropy",
          "distinct_tokens", "response_tokens", "truncated", "lr", "grad_norm", "tokens_per_s")


class Tracker(Protocol):
    def log(self, step: int, values: dict) -> None: ...

    def close(self) -> None: ...


def check_available(kind: str) -> None:
    package = PACKAGES.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise OpcdError(f"--report-to {kind} needs the {package} package: pip install '{package}' (or the opcd[{kind}] "
                        "extra), or drop --report-to")


class TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        for key in LOGGED:
            if isinstance(values.get(key), (int, float)):
                self.writer.add_scalar(f"train/{key}", values[key], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, folder: Path, name: str, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "opcd"), name=name, dir=str(folder),
                              config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, step: int, values: dict) -> None:
        self.run.log({f"train/{k}": values[k] for k in LOGGED if isinstance(values.get(k), (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()


class NoTracker:
    def log(self, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_tracker(kind: str, folder: Path, name: str, config: dict) -> Tracker:
    """The tracker ``kind`` writing into the run ``folder``."""
    check_available(kind)
    if kind == "tensorboard":
        return TensorBoard(folder)
    if kind == "wandb":
        return WandB(folder, name, config)
    return NoTracker()
