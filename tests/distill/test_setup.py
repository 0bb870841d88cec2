"""``distill.setup``: what ``prepare`` loads, checks and builds before anything is written, and
``distill.samplers``: the one decision of which engine serves which role."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from opcd_cli.config import DistillConfig
from opcd_cli.errors import OpcdError


def test_prepare_builds_the_run_and_writes_nothing(prepared):
    from opcd_cli import models
    from opcd_cli.distill.records import Run

    cfg, run, out = prepared
    assert isinstance(run, Run) and run.cfg is cfg
    assert not out.partial.exists() and not out.final.exists()  # nothing written before the run begins
    assert len(run.views) == len(run.examples) > 0 and run.eval_examples and run.ood_examples
    assert run.teacher is not run.student and not any(p.requires_grad for p in run.teacher.parameters())
    assert run.trainable_parameters == sum(p.numel() for p in run.student.parameters())
    assert run.loss.vocab == models.shared_vocab_size(run.student, run.teacher, run.tokenizer, "s", "t")
    assert run.loss.topk == cfg.loss.topk == 4
    # every teacher prompt starts with the cached prefix: the rendered context, which the student never reads
    prefix = run.teacher_prefix.ids
    assert all(list(v.teacher_ids[: len(prefix)]) == prefix for v in run.views)
    assert all(list(v.student_ids[: len(prefix)]) != prefix for v in run.views)
    assert not run.packer.packed  # padded rows unless --micro-batch-tokens


def test_load_models_is_a_record_with_one_renderer_for_one_tokenizer(config):
    from opcd_cli.distill.records import Models
    from opcd_cli.distill.setup import load_models
    from opcd_cli.ui import UI

    m = load_models(config(), UI(quiet=True))
    assert isinstance(m, Models) and m.teacher_name == "toy:small"
    assert m.student_renderer is m.teacher_renderer  # the default teacher shares the student's tokenizer
    live = load_models(config(teacher_kind="live"), UI(quiet=True))
    assert live.teacher is live.student
    with pytest.raises(OpcdError, match="topk 100000 is larger than the vocabulary"):
        load_models(config(topk=100000), UI(quiet=True))


def test_a_prompt_longer_than_the_window_is_refused_naming_its_row(prepared):
    from dataclasses import replace

    from opcd_cli.distill.records import Models
    from opcd_cli.distill.setup import check_rows

    cfg, run, _ = prepared
    m = Models(run.student, run.teacher, run.tokenizer, "toy:small", run.loss.vocab, run.student_renderer,
               run.teacher_renderer)
    check_rows(cfg, m, run.examples, run.views)  # the toy run fits
    too_long = replace(cfg, sampling=replace(cfg.sampling, max_new_tokens=100_000))
    with pytest.raises(OpcdError, match=f"row {run.examples[0].row}: the student prompt is .* exceeds"):
        check_rows(too_long, m, run.examples, run.views)


def test_check_world_wants_a_global_batch_that_splits(prepared):
    from opcd_cli.distill.setup import check_world

    cfg = DistillConfig(student="toy:small", data="toy:codes/train", batch_size=3)
    check_world(cfg, SimpleNamespace(active=False, size=1))
    check_world(cfg, SimpleNamespace(active=True, size=3))
    with pytest.raises(OpcdError, match=r"batch_size 3 x grad_accum 1 = 3 prompts a step\) does not split across 2"):
        check_world(cfg, SimpleNamespace(active=True, size=2))


def check_roles(engines: dict, roles: dict, made_for) -> None:
    """Each role's engine is None, the engine of the role ``roles`` names, or made for what ``roles`` says."""
    for role, engine in engines.items():
        expected = roles.get(role)
        if expected is None:
            assert engine is None, role
        elif isinstance(expected, str):
            assert engine is engines[expected], role
        else:
            assert made_for(engine) == expected, role


class Engine:
    """A stand-in sampler that says which model and batch size it was made for."""

    def __init__(self, which, batch_size, follows_training):
        self.which, self.batch_size, self.follows, self.closed = which, batch_size, follows_training, 0
        self.name = "engine"

    def close(self):
        self.closed += 1


@pytest.mark.parametrize("settings, roles", [
    # (settings, {role: (model, batch size, follows training) or the role it shares an engine with})
    ({}, {"training": ("student", 8, True), "evaluation": ("student", 64, False)}),
    ({"sampler": "vllm"}, {"training": ("student", 8, True), "evaluation": "training"}),
    ({"mode": "off-policy"}, {"training": ("student", 8, False), "rollouts": ("teacher", 8, False),
                              "evaluation": ("student", 64, False)}),
    ({"mode": "off-policy", "sampler": "vllm"}, {"training": ("student", 8, False), "rollouts": "training",
                                                 "evaluation": "training"}),
    ({"env": "doors"}, {"training": ("student", 8, True), "evaluation": ("student", 64, False)}),
    ({"env": "doors", "mode": "off-policy"}, {"training": ("student", 8, False), "player": ("teacher", 8, False),
                                              "evaluation": ("student", 64, False)}),
    ({"env": "doors", "mode": "off-policy", "sampler": "vllm"}, {"training": ("student", 8, False),
                                                                 "player": "training", "evaluation": "training"}),
    ({"env": "doors", "mode": "off-policy", "sampler": "vllm", "teacher": "toy:large"},
     {"training": ("student", 8, False), "player": ("teacher", 8, False), "evaluation": "training"}),
])
def test_one_function_decides_which_engine_serves_each_role(monkeypatch, settings, roles):
    import opcd_cli.distill.samplers as samplers_module
    from opcd_cli.distributed import SplitAcrossRanks

    monkeypatch.setattr(samplers_module, "new_sampler", lambda run, which, batch_size, follows_training=False:
                        Engine(which, batch_size, follows_training))
    data = {} if "env" in settings else {"data": "toy:codes/train"}
    cfg = DistillConfig(student="toy:small", **data, **settings)
    run = SimpleNamespace(cfg=cfg, rollouts=None, eval_examples=[1])
    got = samplers_module.open_samplers(run, "student")
    engines = {role: getattr(got, role) for role in ("training", "player", "rollouts", "evaluation")}
    for role in ("rollouts", "evaluation"):  # what samples for the whole world splits its prompts across ranks
        if engines[role] is not None:
            assert isinstance(engines[role], SplitAcrossRanks)
            engines[role] = engines[role].sampler
    check_roles(engines, roles, lambda engine: (engine.which, engine.batch_size, engine.follows))
    got.close()
    assert all(e.closed == 1 for e in engines.values() if e is not None)  # a shared engine is closed once


@pytest.mark.parametrize("settings, roles", [
    ({"teacher": "toy:large"}, {"evaluation": ("teacher", 64)}),
    ({"teacher": "toy:large", "eval_before": False}, {}),
    ({"teacher": "toy:large", "mode": "off-policy"}, {"evaluation": ("teacher", 64), "rollouts": ("teacher", 8)}),
    ({"teacher": "toy:large", "mode": "off-policy", "sampler": "vllm"}, {"evaluation": ("teacher", 64),
                                                                         "rollouts": "evaluation"}),
    ({}, {}),  # the default teacher has no work of its own before training
])
def test_a_separate_teachers_work_before_training_has_its_own_samplers(monkeypatch, settings, roles):
    import opcd_cli.distill.samplers as samplers_module

    monkeypatch.setattr(samplers_module, "new_sampler", lambda run, which, batch_size, follows_training=False:
                        Engine(which, batch_size, follows_training))
    cfg = DistillConfig(student="toy:small", data="toy:codes/train", eval_data="toy:codes/test", **settings)
    got = samplers_module.open_samplers(SimpleNamespace(cfg=cfg, rollouts=None, eval_examples=[1]), "teacher")
    assert got.training is None and got.player is None
    engines = {role: getattr(got, role) and getattr(got, role).sampler for role in ("rollouts", "evaluation")}
    check_roles(engines, roles, lambda engine: (engine.which, engine.batch_size))
