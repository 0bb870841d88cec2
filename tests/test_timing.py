"""StepTimer: seconds per phase, summed over repeats, reset after each read; and the training-step benchmark."""

import json
import os
import subprocess
import sys
import time

import pytest

from opcd_cli.timing import StepTimer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_phases_are_summed_and_reset():
    timer = StepTimer("cpu")
    for _ in range(2):
        with timer.phase("teacher_forward"):
            time.sleep(0.02)
    with timer.phase("loss"):
        time.sleep(0.01)
    seconds = timer.seconds()
    assert list(seconds) == ["teacher_forward", "loss"]  # in the order the phases first ran
    assert 0.04 <= seconds["teacher_forward"] < 0.5
    assert 0.01 <= seconds["loss"] < 0.5
    assert timer.seconds() == {}


def test_a_phase_that_raises_is_still_recorded():
    timer = StepTimer("cpu")
    with pytest.raises(ValueError):
        with timer.phase("rollouts"):
            raise ValueError("boom")
    assert set(timer.seconds()) == {"rollouts"}


@pytest.mark.slow  # builds two tiny models and trains a few steps: about 15 s
def test_train_step_benchmark_runs_on_a_cpu(tmp_path):
    out = tmp_path / "step.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_train_step.py"), "--size", "tiny", "--prompts", "2",
           "--prompt-tokens", "8", "--context-tokens", "16", "--response-tokens", "8", "--steps", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["rollout"]["tokens"] == 16  # random weights never stop early: 2 prompts x 8 tokens
    step = result["kernels"]["torch"]
    phases = ("teacher_forward", "student_forward", "loss", "backward", "optimizer")
    assert all(step["median"][p] > 0 for p in phases)
    assert sum(step["median"][p] for p in phases) <= step["median"]["step_s"] * 1.05
    assert len(step["steps"]) == 2 and all(loss > 0 for loss in step["median"]["losses"])
