"""Built-in names resolve in one place, and every run writes the inputs it used into its data/ folder."""

import json

import pytest

from opcd_cli import sources
from opcd_cli.data import load_examples, read_context
from opcd_cli.errors import OpcdError
from opcd_cli.toy import world


def test_toy_names_resolve_to_the_world_s_splits_and_models():
    splits = world.splits("codes")
    assert [e.to_record() for e in load_examples("toy:codes/test")] == splits.test
    assert len(load_examples("toy:codes/extract-train")) == world.EXTRACT_TRAIN
    assert read_context("toy:shift/context") == world.splits("shift").context.strip("\n")
    assert sources.model_folder("toy:large") == str(world.model_path("large"))
    assert "{traces}" in sources.text("toy:extraction-template")


@pytest.mark.parametrize("name, message", [
    ("toy:nonsense/train", "unknown built-in name"),
    ("toy:codes/holdout", "unknown built-in split"),
    ("toy:codes", "unknown built-in name"),
])
def test_unknown_built_in_names_are_one_line_errors(name, message):
    with pytest.raises(OpcdError, match=message):
        load_examples(name)


def test_a_run_writes_the_inputs_it_used(cli, tiny_student, toy_files, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = cli("distill", "--student", tiny_student, "--data", toy_files["train"], "--context",
                               toy_files["context"], "--eval-data", toy_files["test"], "--steps", "1",
                               "--batch-size", "2", "--topk", "4", "--max-new-tokens", "2", "-o", out, "--json")
    assert code == 0, stderr
    inputs = json.loads(stdout)["inputs"]
    assert set(inputs) == {"train", "test", "context"}
    for name, source in (("train", toy_files["train"]), ("test", toy_files["test"])):
        assert inputs[name] == str(out / "data" / f"{name}.jsonl")
        assert [json.loads(line) for line in (out / "data" / f"{name}.jsonl").read_text().splitlines()] == \
               [json.loads(line) for line in source.read_text().splitlines()]
    assert (out / "data" / "context.txt").read_text() == toy_files["context"].read_text()


def test_toy_task_chooses_the_built_in_recipe(cli, tmp_path):
    code, _, stderr = cli("distill", "--toy-task", "shift", "--student", "toy:small", "-o", tmp_path / "a")
    assert code == 2 and "drop --student or --toy-task" in stderr
    code, _, stderr = cli("distill", "--toy-task", "reverse", "-o", tmp_path / "b")
    assert code == 2 and "--toy-task must be one of codes, shift" in stderr
    code, _, stderr = cli("distill", "--data", "x.jsonl", "-o", tmp_path / "c")
    assert code == 2 and "--data needs --student" in stderr
    assert not any(tmp_path.iterdir())
