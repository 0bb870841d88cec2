"""The mass-escape guard: the student's top-k mass watched every step (``--min-topk-mass``, ``--stop-on-escape``)."""

import json

import pytest
import torch

from test_distill_cli import distill_args, with_flags

from opcd_cli.escape import EscapeGuard


def test_the_guard_keeps_the_weights_of_the_last_step_above_the_threshold():
    layer = torch.nn.Linear(3, 2)
    guard = EscapeGuard(0.8, stop=True, parameters=layer.parameters())
    weights = []
    for step, mass in enumerate([0.95, 0.9, 0.85, 0.4], start=1):
        weights.append(layer.weight.detach().clone())  # the weights step `step` measures (after step - 1)
        escape = guard.check(step, mass)
        if escape is None:
            with torch.no_grad():
                layer.weight.add_(1.0)  # the step's update
    assert escape.step == 4 and escape.stopped and escape.kept_step == 2 and escape.topk_mass == 0.4
    guard.restore()
    assert torch.equal(layer.weight, weights[2])  # measured good at step 3: the weights after step 2
    assert guard.check(5, 0.1) is None  # once


def test_a_mass_low_from_the_start_is_reported_and_stops_nothing():
    layer = torch.nn.Linear(3, 2)
    guard = EscapeGuard(0.8, stop=True, parameters=layer.parameters())
    escape = guard.check(1, 0.5)
    assert not escape.stopped and escape.kept_step is None and "from the start" in escape.message()
    assert EscapeGuard(0.0, stop=False, parameters=[]).check(3, 0.0) is None  # 0: no guard


MASSES = [0.95, 0.9, 0.5, 0.4]  # the step-by-step top-k mass the test makes the loss report


@pytest.fixture
def scripted_mass(monkeypatch):
    """The loss reports the top-k masses of MASSES, step after step (one micro-batch a step)."""
    from opcd_cli.loss import DistillLoss

    real, calls = DistillLoss.on_policy, []

    def on_policy(self, *args, **kwargs):
        parts = real(self, *args, **kwargs)
        parts.topk_mass = torch.full_like(parts.topk_mass, MASSES[len(calls)])
        calls.append(1)
        return parts

    monkeypatch.setattr(DistillLoss, "on_policy", on_policy)


def test_stop_on_escape_keeps_the_last_good_weights(cli, tiny_student, toy_files, tmp_path, scripted_mass):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    code, stdout, stderr = cli(*with_flags(distill_args(tiny_student, toy_files, out, "--stop-on-escape", "--json"),
                                           {"--steps": "4", "--save-every": "1", "--min-topk-mass": "0.8"}))
    assert code == 0, stderr
    escape = json.loads(stdout)["topk_mass_escape"]
    assert escape == {"step": 3, "topk_mass": 0.5, "threshold": 0.8, "stopped": True, "kept_step": 1}
    assert stderr.count("warning: step 3: the student's top-k mass is 0.500, below --min-topk-mass 0.8") == 2  # the
    # line at the step, and again under the summary
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 3 measured, not applied; no step 4
    final, kept = load_file(out / "model.safetensors"), load_file(out / "checkpoints" / "step-000001" / "model.safetensors")
    later = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    assert all(torch.equal(final[name], kept[name]) for name in kept)
    assert any(not torch.equal(final[name], later[name]) for name in later)


def test_without_stop_the_guard_warns_once_and_training_goes_on(cli, tiny_student, toy_files, tmp_path, scripted_mass):
    out = tmp_path / "run"
    code, stdout, stderr = cli(*with_flags(distill_args(tiny_student, toy_files, out, "--json"),
                                           {"--steps": "4", "--min-topk-mass": "0.8"}))
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["topk_mass_escape"] == {"step": 3, "topk_mass": 0.5, "threshold": 0.8, "stopped": False,
                                           "kept_step": None}
    assert stderr.count("below --min-topk-mass 0.8: the loss may be lowered") == 2  # at step 3 (not again at 4),
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # and under the summary
