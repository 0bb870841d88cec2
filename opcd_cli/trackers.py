"""Experiment trackers (``--report-to``): the per-step metrics of ``metrics.jsonl`` sent, as they are logged, to
TensorBoard or Weights & Biases through their own libraries, the way TRL users expect.

* ``tensorboard``: event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN``); needs ``tensorboard``.
* ``wandb``: a run in ``RUN/wandb``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it
  later); needs ``wandb``.

Both are optional extras (``pip install 'opcd[tensorboard]'``, ``'opcd[wandb]'``); a missing one is a one-line
error before any model loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Protocol

from .errors import OpcdError, first_line

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
LOGGED = ("loss", "distill_loss", "consistency_loss", "anchor_loss", "reward", "reward_loss", "topk_mass",
          "student_entropy", "teacher_entropy",
          "distinct_tokens", "response_tokens", "truncated", "lr", "grad_norm", "tokens_per_s")


class Tracker(Protocol):
    def log(self, step: int, values: dict) -> None: ...

    def close(self) -> None: ...


WANDB_MODES = ("offline", "online", "shared", "disabled", "dryrun", "run")  # what wandb.init takes
WANDB_ONLINE = ("online", "shared", "run")
WANDB_HOST = "https://api.wandb.ai"


def check_available(kind: str) -> None:
    """Before any model loads: the tracker's package, and for wandb its mode and, online, a key and a server
    that answers (wandb itself would wait about 100 s for one that does not, then end in a traceback)."""
    package = PACKAGES.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise OpcdError(f"--report-to {kind} needs the {package} package: pip install '{package}' (or the opcd[{kind}] "
                        "extra), or drop --report-to")
    if kind != "wandb":
        return
    mode = wandb_mode()
    if mode not in WANDB_MODES:
        raise OpcdError(f"WANDB_MODE={mode!r} is not a mode wandb knows ({', '.join(WANDB_MODES)}); unset it to "
                        "log offline (wandb sync uploads later)")
    if mode not in WANDB_ONLINE:
        return
    host = os.environ.get("WANDB_BASE_URL", WANDB_HOST)
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        raise OpcdError(f"--report-to wandb with WANDB_MODE={mode} needs an API key (WANDB_API_KEY, or `wandb login`); "
                        "or unset WANDB_MODE to log offline")
    from .models import hub_reachable

    if not hub_reachable(host):
        raise OpcdError(f"--report-to wandb with WANDB_MODE={mode}: {host} cannot be reached; unset WANDB_MODE to log "
                        "offline (wandb sync uploads the run later)")


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE", "offline")


def _netrc_has(url: str) -> bool:
    """Whether the netrc file (``wandb login`` writes one) holds a password for ``url``'s host."""
    import netrc
    from urllib.parse import urlparse

    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(url).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


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
    """A wandb run; whatever wandb prints goes to standard error (standard output is ``--json``'s), and a failure
    of its own is one line."""

    def __init__(self, folder: Path, name: str, config: dict):
        import wandb

        with contextlib.redirect_stdout(sys.stderr):
            try:
                self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "opcd"), name=name, dir=str(folder),
                                      config=config, mode=wandb_mode(), settings=wandb.Settings(init_timeout=60))
            except Exception as e:  # wandb's own errors: a refused key, a server that stopped answering
                raise OpcdError(f"--report-to wandb: wandb could not start its run: {first_line(e)}; unset WANDB_MODE "
                                "to log offline") from None

    def log(self, step: int, values: dict) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.run.log({f"train/{k}": values[k] for k in LOGGED if isinstance(values.get(k), (int, float))},
                         step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
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
