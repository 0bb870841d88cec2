"""``opcd distill --dry-run``: the memory plan read from configs alone, against the model's real sizes."""

from __future__ import annotations

import json

import pytest

from opcd_cli.cli import main


def plan(capsys, *args) -> dict:
    assert main(["distill", "--dry-run", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_plan_counts_the_toy_students_parameters_exactly_and_shards_them(capsys):
    from opcd_cli import models, sources

    toy = models.load_model(sources.model_folder("toy:small"), "float32")
    parameters = sum(p.numel() for p in toy.parameters())
    one, four = plan(capsys), plan(capsys, "--world-size", "4")
    assert one["student_parameters"] == one["trainable_parameters"] == parameters
    gib = parameters / 1024**3
    assert one["gib"]["student weights"] == pytest.approx(4 * gib)
    assert one["gib"]["optimizer (AdamW)"] == pytest.approx(8 * gib)
    assert one["gib"]["gathered by FSDP2"] == 0
    assert four["gib"]["student weights"] == pytest.approx(gib)  # a quarter of the float32 master weights
    assert four["gib"]["teacher"] == one["gib"]["teacher"]  # replicated by default
    assert plan(capsys, "--world-size", "4", "--teacher-sharding", "shard")["gib"]["teacher"] == pytest.approx(
        one["gib"]["teacher"] / 4)
    assert four["gib"]["gathered by FSDP2"] > 0


def test_checkpointing_and_lora_shrink_the_plan(capsys):
    full, checkpointed = plan(capsys), plan(capsys, "--gradient-checkpointing")
    assert checkpointed["activations_gib_per_1k_tokens"] < full["activations_gib_per_1k_tokens"] / 2
    lora = plan(capsys, "--lora-rank", "8")
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] / 5
    assert lora["gib"]["teacher"] == 0  # the base with its adapters off: no second copy
    assert lora["gib"]["optimizer (AdamW)"] < full["gib"]["optimizer (AdamW)"] / 5
    assert full["longest_prompt_tokens"] > 10 and full["micro_batch_tokens_at_most"] == 16 * (
        full["longest_prompt_tokens"] + 24)  # the toy recipe: 16 prompts a micro-batch, 24 new tokens
    budget = plan(capsys, "--micro-batch-tokens", "200")  # a token budget bounds the micro-batch instead
    assert budget["micro_batch_tokens_at_most"] == 200 and budget["total_gib_at_longest_micro_batch"] == pytest.approx(
        budget["fixed_gib"] + budget["activations_gib_per_1k_tokens"] * 0.2)


def test_world_size_belongs_to_the_dry_run(capsys):
    assert main(["distill", "--world-size", "2"]) == 2
    assert "--world-size plans a launch with --dry-run" in capsys.readouterr().err
