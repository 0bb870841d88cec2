"""Every recipe parses into a valid config, opens with the command that runs it, and the toy one is the default."""

from pathlib import Path

import pytest

from opcd_cli.config import build_distill_config, read_recipe
from opcd_cli.toy.world import TOY_SETTINGS

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


def test_there_are_toy_and_paper_recipes():
    names = {p.stem for p in RECIPES}
    assert {"toy-shift", "toy-codes", "qwen3-8b-to-1.7b-experience"} <= names
    assert any("llama-3.2-3b" in n for n in names)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_opens_with_its_command_and_is_valid(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith(f"# opcd distill --recipe recipes/{recipe.name}")
    settings = read_recipe(recipe)
    flags = {} if "student" not in settings else {"data": "train.jsonl", "context": "context.txt"}
    cfg = build_distill_config(settings, flags)
    if cfg.student is not None:
        assert cfg.topk == 256 and 1e-6 <= cfg.lr <= 5e-6  # the paper's settings


def test_toy_recipe_is_what_opcd_distill_runs_by_default():
    default = next(p for p in RECIPES if p.stem == "toy-codes")
    assert build_distill_config(TOY_SETTINGS) == build_distill_config(read_recipe(default))
