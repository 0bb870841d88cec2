"""Seconds per phase of a training step, without stalling the GPU.

On a GPU each phase is a pair of CUDA events recorded in stream order; they are read once, at the end of the
step (``seconds``), which is the step's only host synchronisation for timing. On a CPU each phase is wall-clock
time. A phase entered several times in one step (one per micro-batch) is summed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


PHASES = ("rollouts", "teacher_forward", "student_forward", "consistency_forward", "backward", "optimizer",
          "weight_push")  # what a distillation step is made of, in order (the fused loss runs inside the forwards)


class NoTimer:
    """Times nothing: for callers of the losses outside a training loop."""

    @contextmanager
    def phase(self, name: str):
        yield

    def seconds(self) -> dict[str, float]:
        return {}


class StepTimer:
    """``with timer.phase("teacher_forward"): ...`` around each phase, then ``timer.seconds()`` once per step."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list[tuple[str, object, object]] = []

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._marks.append((name, start, end))
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                self._marks.append((name, start, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase since the last call, in the order the phases first ran; resets the timer."""
        totals: dict[str, float] = defaultdict(float)
        if self.cuda and self._marks:
            self._marks[-1][2].synchronize()  # every earlier event has completed once the last one has
        for name, start, end in self._marks:
            totals[name] += start.elapsed_time(end) / 1e3 if self.cuda else end - start
        self._marks = []
        return dict(totals)
