"""Every recipe parses into a valid config and opens with the command that runs it; the built-in toy recipes are
packaged twins of the repository's and are what `opcd distill` and `opcd extract` run with no model arguments."""

from pathlib import Path

import pytest

from opcd_cli import sources
from opcd_cli.config import ExtractConfig, build_distill_config, build_extract_config, read_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


def command_of(recipe: Path) -> str:
    return "extract" if recipe.stem.endswith("-extract") else "distill"


def test_there_are_toy_and_paper_recipes():
    names = {p.stem for p in RECIPES}
    assert {"toy-shift", "toy-codes", "toy-recall", "toy-codes-extract", "qwen3-8b-to-1.7b-experience"} <= names
    assert any("llama-3.2-3b" in n for n in names)
    assert {"qwen3-8b-experience-8gpu", "qwen3-8b-experience-2nodes"} <= names  # the paper's settings, scaled out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_opens_with_its_command_and_is_valid(recipe):
    first = recipe.read_text().splitlines()[0]
    if first.startswith("# torchrun "):  # several processes: the launch command comes first
        assert f" -m opcd_cli {command_of(recipe)} --recipe recipes/{recipe.name}" in first
    else:
        assert first.startswith(f"# opcd {command_of(recipe)} --recipe recipes/{recipe.name}")
    if command_of(recipe) == "extract":
        assert build_extract_config(read_recipe(recipe, ExtractConfig)).model is not None
        return
    settings = read_recipe(recipe)
    flags = {} if sources.is_builtin(settings["student"]) else {"context": "context.txt"} | (
        {} if "env" in settings else {"data": "train.jsonl"})  # a game's recipe plays its environment instead
    cfg = build_distill_config(settings, flags)
    if not sources.is_builtin(cfg.student):
        assert cfg.loss.topk == 256 and 1e-6 <= cfg.optim.lr <= 5e-6  # the paper's settings


@pytest.mark.parametrize("name", sources.builtin_recipes())
def test_built_in_recipes_are_twins_of_the_repository_ones(name):
    twin = Path(__file__).parent.parent / "recipes" / f"{name}.toml"
    assert sources.recipe_file(name).read_bytes() == twin.read_bytes()


def test_built_in_names_resolve():
    assert read_recipe("toy-codes") == read_recipe(Path(__file__).parent.parent / "recipes" / "toy-codes.toml")
    cfg = build_distill_config(read_recipe("toy-shift"))
    assert cfg.student == "toy:small" and cfg.data == "toy:shift/train" and cfg.name == "toy-shift"
    assert cfg.default_output_dir().startswith("runs/toy-shift-")
