"""The mass-escape guard: the student's probability inside its own top-k, watched step by step.

The on-policy loss sums over the student's top-k only. It can be lowered by matching the teacher there, or by
moving the student's probability out of the top-k, where no term sees it: the loss falls while the top-k mass
falls with it, and the student loses what it knew without learning the context. The guard watches the step's
mean top-k mass (measured on the weights about to be updated, before the update) against ``--min-topk-mass``:
the first time it is below, a warning, once; with ``--stop-on-escape``, the run stops there and keeps the
weights of the last step whose mass was above it (a copy of the trainable weights is kept for that, on their
own device: the memory of one more copy of them). A mass below the threshold from the first step is a top-k
too small for the model, not an escape: it is reported, and nothing stops.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Escape:
    step: int  # the step whose measurement fell below (its update is not applied when the run stops)
    topk_mass: float
    threshold: float
    stopped: bool  # the run stopped here
    kept_step: int | None  # stopped: the weights kept are those after this step (0: the initial weights)

    def message(self) -> str:
        what = (f"step {self.step}: the student's top-k mass is {self.topk_mass:.3f}, below --min-topk-mass "
                f"{self.threshold:g}")
        if self.step == 1:
            return f"{what} from the start: its top-k is small for it; raise --topk (or lower --min-topk-mass)"
        if self.stopped:
            return (f"{what}: the loss is being lowered by moving mass out of the top-k; stopped, keeping the weights "
                    f"after step {self.kept_step} (the last above it)")
        return (f"{what}: the loss may be lowered by moving mass out of the top-k rather than by matching the teacher "
                "(try --topk-tail, a lower --lr, or --stop-on-escape)")

    def to_dict(self) -> dict:
        return asdict(self)


class EscapeGuard:
    """``check`` each step's top-k mass; ``restore`` the kept weights after a stop. A threshold of 0 watches
    nothing."""

    def __init__(self, threshold: float, stop: bool, parameters):
        self.threshold, self.stop = threshold, stop
        self.escape: Escape | None = None
        self._parameters = [p for p in parameters if p.requires_grad] if stop else []
        self._kept: list[torch.Tensor] | None = None
        self._kept_step: int | None = None

    def check(self, step: int, topk_mass: float) -> Escape | None:
        """The escape, the first time the mass is below the threshold (None otherwise). ``step``'s measurement is
        of the weights after step - 1: when it passes, those are kept (with ``stop``)."""
        if self.threshold <= 0 or self.escape is not None:
            return None
        if topk_mass >= self.threshold:
            if self.stop:
                self._keep(step - 1)
            return None
        stopped = self.stop and self._kept is not None
        self.escape = Escape(step, topk_mass, self.threshold, stopped, self._kept_step if stopped else None)
        return self.escape

    @torch.no_grad()
    def _keep(self, step: int) -> None:
        if self._kept is None:
            self._kept = [p.detach().clone() for p in self._parameters]
        else:
            for kept, p in zip(self._kept, self._parameters):
                kept.copy_(p.detach())
        self._kept_step = step

    @torch.no_grad()
    def restore(self) -> None:
        """Put the kept weights back in place (after a stop)."""
        for kept, p in zip(self._kept, self._parameters):
            p.copy_(kept)
        self._kept = None
