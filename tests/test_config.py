import json

import pytest

from opcd_cli.config import DistillConfig, EvalConfig, SamplingOptions, build_distill_config, read_recipe
from opcd_cli.errors import OpcdError


def test_layers_later_wins_and_none_means_not_given():
    cfg = build_distill_config({"lr": 1e-5, "steps": 7, "temperature": 0.6}, {"lr": 2e-5, "steps": None})
    assert cfg.optim.lr == 2e-5 and cfg.optim.steps == 7
    assert cfg.sampling.temperature == 0.6


def test_recipe_tables_flatten_and_flags_override(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('student = "s"\ndata = "d.jsonl"\ntopk = 64\n[sampling]\ntemperature = 0.7\n[loading]\ndtype = "bfloat16"\n')
    cfg = build_distill_config(read_recipe(recipe), {"topk": 32})
    assert (cfg.student, cfg.loss.topk, cfg.sampling.temperature, cfg.loading.dtype) == ("s", 32, 0.7, "bfloat16")


@pytest.mark.parametrize(
    "text, message",
    [
        ("nonsense = 1\n", "unknown setting 'nonsense'"),
        ("[sampling]\nwarmth = 1\n", "unknown setting sampling.warmth"),
        ("lr = \n", "not valid TOML"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(OpcdError, match=message):
        read_recipe(recipe)


def test_missing_recipe(tmp_path):
    with pytest.raises(OpcdError, match="does not exist"):
        read_recipe(tmp_path / "none.toml")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"topk": 0}, "topk must be at least 1"),
        ({"lr": -1e-6}, "lr must be positive"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"steps": 0}, "steps must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"context_as": "preamble"}, "context_as must be one of"),
        ({"temperature": -0.5}, "temperature must be"),
        ({"top_p": 0.0}, "top_p must be"),
        ({"student": "m"}, "--student needs --data"),
        ({"data": "d.jsonl"}, "--data needs --student"),
        ({"n": 4}, "one response per prompt"),
        ({"steps": "ten"}, "steps must be a whole number; got .ten."),
        ({"topk_renorm": True, "topk_tail": True}, "--topk-renorm and --topk-tail each make"),
        ({"topk_tail": True, "mode": "off-policy"}, "--topk-tail shapes the on-policy loss"),
        ({"topk_support": "union", "mode": "off-policy"}, "--topk-support chooses the on-policy loss's support"),
        ({"teacher_kind": "ema", "mode": "off-policy"}, "--teacher-kind ema moves the teacher"),
        ({"teacher_kind": "live", "teacher": "toy:large"}, "--teacher-kind live makes the teacher from the student"),
        ({"teacher_kind": "ema", "lora_rank": 4}, "--teacher-kind ema averages the student's full weights"),
        ({"teacher_kind": "ema", "ema_decay": 1.0}, "ema_decay must be in \\(0, 1\\)"),
        ({"teacher_kind": "teacher"}, "teacher_kind must be one of frozen, ema, live"),
        ({"min_topk_mass": 1.0}, "min_topk_mass must be a fraction in \\[0, 1\\)"),
        ({"min_topk_mass": -0.1}, "min_topk_mass must be a fraction"),
        ({"stop_on_escape": True, "mode": "off-policy"}, "--stop-on-escape watches"),
        ({"stop_on_escape": True, "min_topk_mass": 0}, "--stop-on-escape watches"),
        ({"anchor_weight": -1}, "anchor_weight must be"),
        ({"consistency_start": 5}, "--consistency-start and --consistency-warmup schedule the regulariser"),
        ({"consistency_warmup": 5}, "--consistency-start and --consistency-warmup schedule the regulariser"),
        ({"consistency_weight": 0.1, "consistency_start": 0}, "consistency_start must be a number of at least 1"),
        ({"consistency_weight": 0.1, "consistency_warmup": -1}, "consistency_warmup must be"),
        ({"anchor_weight": 1.0, "mode": "off-policy"}, "the in-context anchor scores the student's own rollouts"),
    ],
)
def test_validation_errors(settings, message):
    with pytest.raises(OpcdError, match=message):
        build_distill_config(settings)


def test_consistency_schedule():
    plain = build_distill_config({"consistency_weight": 0.2})
    assert [plain.loss.consistency_weight_at(s) for s in (1, 2, 50)] == [0.2, 0.2, 0.2]  # the paper's form
    late = build_distill_config({"consistency_weight": 0.2, "consistency_start": 3, "consistency_warmup": 4})
    assert [late.loss.consistency_weight_at(s) for s in range(1, 9)] == pytest.approx(
        [0, 0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    delayed = build_distill_config({"consistency_weight": 0.2, "consistency_start": 3})
    assert [delayed.loss.consistency_weight_at(s) for s in (1, 2, 3, 4)] == [0, 0, 0.2, 0.2]


def test_configs_are_frozen():
    cfg = DistillConfig()
    with pytest.raises(Exception):
        cfg.optim = 1.0  # type: ignore[misc]
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert build_distill_config(read_recipe("toy-codes")).default_output_dir().startswith("runs/toy-codes-")


def test_eval_config_rules():
    with pytest.raises(OpcdError, match="greedy"):
        EvalConfig(models=("m",), data="d", sampling=SamplingOptions(temperature=0.0, n=2))
    with pytest.raises(OpcdError, match="at least one --model"):
        EvalConfig(models=(), data="d")


def test_settings_in_groups_keep_their_flat_names(tmp_path):
    """The settings live in groups (``cfg.loss.topk``) but flags, recipe keys and ``opcd_config.json`` name them
    flat, as before the grouping: a recipe may put a key at the top or in its group's table, and a run folder
    written before the grouping holds the same keys a run writes now."""
    from pathlib import Path

    from opcd_cli.config import LossOptions, OptimOptions, flatten_settings

    recipe = tmp_path / "r.toml"
    recipe.write_text('student = "s"\ndata = "d"\n[loss]\ntopk = 64\n[optim]\nlr = 2e-6\n[lora]\nlora_rank = 4\n')
    grouped = build_distill_config(read_recipe(recipe))
    flat = build_distill_config({"student": "s", "data": "d", "topk": 64, "lr": 2e-6, "lora_rank": 4})
    assert grouped == flat == DistillConfig(student="s", data="d", loss=LossOptions(topk=64),
                                            optim=OptimOptions(lr=2e-6), lora_rank=4)
    assert (grouped.loss.topk, grouped.optim.lr, grouped.lora.lora_rank, grouped.per_step) == (64, 2e-6, 4, 8)
    old = json.loads((Path(__file__).parent / "fixtures/run-before-groups/run/opcd_config.json").read_text())
    from dataclasses import fields

    from opcd_cli.config import FieldOptions

    added = {f.name for f in fields(FieldOptions)}  # the row mapping, which came after that folder, and the
    added |= {"objective", "jsd_beta", "reward_weight", "reward_std", "samples_per_prompt",  # objectives beside OPCD's
              "anchor_start", "anchor_warmup", "user_prefix_consistency"}  # the anchor's schedule, a default
    assert set(grouped.to_dict()) == set(old) | added and set(grouped.to_dict()["sampling"]) == set(old["sampling"])
    assert build_distill_config(flatten_settings(grouped.to_dict())) == grouped  # what a run writes, read back
    recipe.write_text("[loss]\ntemperature = 0.5\n")
    with pytest.raises(OpcdError, match="unknown setting loss.temperature; known: anchor_start, anchor_warmup, anchor_weight, "):
        read_recipe(recipe)
    with pytest.raises(OpcdError, match="bad setting: DistillConfig got an unexpected keyword argument 'warmth'"):
        build_distill_config({"warmth": 1})
