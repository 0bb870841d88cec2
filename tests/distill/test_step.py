"""``distill.step``: one training step on the prepared toy run, tested directly: its sequences, its counts, the
passes' loss and gradient, the optimiser step and the sampler following it, the record it returns."""

from __future__ import annotations

import math

import pytest
import torch

from opcd_cli.errors import OpcdError


class Following:
    """The run's Hugging Face sampler, remembering the weights it was told to follow."""

    def __init__(self, sampler):
        self.sampler, self.pushed, self.name = sampler, [], sampler.name

    def generate(self, prompts, options):
        return self.sampler.generate(prompts, options)

    def update_weights(self, model):
        self.pushed.append(model)
        self.sampler.update_weights(model)


def test_one_step_samples_scores_descends_and_records(prepared):
    from opcd_cli.distill.samplers import Samplers, new_sampler
    from opcd_cli.distill.step import new_training, step_counts, step_sequences, take_step
    from opcd_cli.escape import EscapeGuard
    from opcd_cli.timing import StepTimer
    from opcd_cli.ui import UI

    cfg, run, _ = prepared
    torch.manual_seed(cfg.seed)
    sampler = Following(new_sampler(run, "student", cfg.per_step, follows_training=True))
    seqs = step_sequences(run, sampler, None, 1)
    assert len(seqs.responses) == cfg.per_step == 2 and all(1 <= len(r) <= 4 for r in seqs.responses)
    counts = step_counts(run, seqs)
    assert (counts.tokens, counts.responses, counts.won) == (sum(map(len, seqs.responses)), 2, 0)
    before = {n: p.detach().clone() for n, p in run.student.named_parameters()}
    teacher_before = [p.detach().clone() for p in run.teacher.parameters()]
    training = new_training(run)
    guard = EscapeGuard(0.0, False, run.student.parameters())
    record = take_step(run, training, Samplers(training=sampler), None, 1, guard, StepTimer(torch.device("cpu")),
                       UI(quiet=True), 0.0)
    assert record["step"] == 1 and math.isfinite(record["loss"]) and record["loss"] >= 0
    assert 0 < record["topk_mass"] <= 1 and record["grad_norm"] > 0
    assert set(record["seconds_by_phase"]) >= {"rollouts", "teacher_forward", "student_forward", "backward", "optimizer"}
    moved = [n for n, p in run.student.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "the optimiser step changed no weight"
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, run.teacher.parameters()))  # a frozen teacher
    assert sampler.pushed == [run.student]  # on-policy, the sampler follows the new weights
    assert all(p.grad is None for p in run.student.parameters())  # zeroed for the next step


def test_the_loss_and_gradient_do_not_depend_on_how_the_step_is_cut(prepared):
    """The step's gradient is the mean over its response tokens: one micro-batch of two sequences or two of one
    give the same sums and the same gradient."""
    from opcd_cli.distill.step import Sequences, forward_loss_backward
    from opcd_cli.timing import StepTimer

    cfg, run, _ = prepared
    views = run.views[:2]
    responses = [[40, 41, 42, 43], [44]] if len(views[0].student_ids) >= len(views[1].student_ids) else [[44], [40, 41, 42, 43]]
    seqs = Sequences(views, responses, [0, 1])
    results = []
    for batch_size in (2, 1):
        run.cfg = cfg.with_settings(batch_size=batch_size)
        try:
            sums = forward_loss_backward(run, seqs, None, 5, StepTimer(torch.device("cpu")))
        finally:
            run.cfg = cfg
        grads = [p.grad.clone() for p in run.student.parameters() if p.grad is not None]
        run.student.zero_grad(set_to_none=True)
        results.append((sums, grads))
    (sums_a, grads_a), (sums_b, grads_b) = results
    assert sums_a[12] > sums_b[12]  # padded: one row of two sequences has padding, two rows of one have none
    torch.testing.assert_close(sums_a[:12], sums_b[:12], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32: padding changes the sums' order


def test_a_step_that_diverges_stops_before_it_is_applied(prepared):
    from opcd_cli.distill.step import step_values

    _, _, out = prepared
    sums = torch.zeros(14)
    values = step_values(1, 4, sums, torch.tensor(0.5), out)
    assert values["loss"] == 0 and values["grad_norm"] == 0.5 and values["padding_share"] == 0.0
    with pytest.raises(OpcdError, match="step 3: the loss is nan .* training diverged .*try a lower --lr"):
        step_values(3, 4, torch.full((14,), float("nan")), torch.tensor(1.0), out)


def test_the_schedule_warms_up_then_decays():
    from opcd_cli.config import DistillConfig
    from opcd_cli.distill.step import lr_lambda

    cfg = DistillConfig(student="toy:small", data="toy:codes/train", steps=10, warmup_steps=2, lr_schedule="linear")
    factor = lr_lambda(cfg)
    assert [factor(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0] and factor(10) == 0.0
    cosine = lr_lambda(DistillConfig(student="toy:small", data="toy:codes/train", steps=4, lr_schedule="cosine"))
    assert cosine(0) == 1.0 and cosine(2) == pytest.approx(0.5) and cosine(4) == pytest.approx(0.0)
