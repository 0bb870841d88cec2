"""Datasets by name (``--data hf:ORG/NAME[:CONFIG]``, ``--split``): read offline from a datasets cache made at test
time in the layout a hub download leaves, or from a folder in a hub repository's layout; the split chosen as a
user expects; and every way it cannot be read is one line."""

from __future__ import annotations

import json

import pytest

from opcd_cli import hub_data
from opcd_cli.config import DistillConfig, EvalConfig, ExtractConfig, FieldOptions
from opcd_cli.data import load_examples
from opcd_cli.errors import OpcdError

from conftest import cached_dataset, write_jsonl


def qa(*pairs) -> list[dict]:
    return [{"question": q, "answer": a} for q, a in pairs]


TRAIN, TEST, VALIDATION = qa(("1+1?", "2"), ("2+2?", "4")), qa(("3+3?", "6")), qa(("4+4?", "8"))


def prompts(examples) -> list[tuple[str, str]]:
    return [(e.prompt, e.answer) for e in examples]


def test_splits_chosen_as_a_user_expects(offline_hub):
    name = cached_dataset(offline_hub, "acme/arith", {"train": TRAIN, "test": TEST, "validation": VALIDATION})
    heard = []
    assert prompts(load_examples(name, say=heard.append)) == [("1+1?", "2"), ("2+2?", "4")]  # training rows: train
    assert "data hf:acme/arith: split train (2 rows; splits train, test, validation)" in heard[0]
    assert prompts(load_examples(name, role="eval")) == [("3+3?", "6")]  # evaluation rows: test first
    assert prompts(load_examples(name, role="scored")) == [("3+3?", "6")]  # opcd eval's --data
    assert prompts(load_examples(name, role="eval", fields=FieldOptions(eval_split="validation"))) == [("4+4?", "8")]
    assert prompts(load_examples(name, fields=FieldOptions(split="validation"))) == [("4+4?", "8")]
    with pytest.raises(OpcdError, match=r"^eval data hf:acme/arith has no split 'dev'; its splits are train, test, "
                                        r"validation: give one with --eval-split$"):
        load_examples(name, what="eval data", role="eval", fields=FieldOptions(eval_split="dev"))

    only = cached_dataset(offline_hub, "acme/only", {"dev": TEST})
    assert prompts(load_examples(only)) == [("3+3?", "6")]  # a dataset's only split, whatever its name
    two = cached_dataset(offline_hub, "acme/two", {"a": TRAIN, "b": TEST})
    with pytest.raises(OpcdError, match="has splits a, b and none is test or validation: choose one with --split"):
        load_examples(two, role="scored")


def test_rows_by_name_read_like_the_same_rows_in_a_file(offline_hub, tmp_path):
    """Rows read the same by name as from a JSONL file, row numbers in messages included; a config by name."""
    rows = [{"question": f"q{i}", "answer": str(i), "meta": {"level": i}} for i in range(3)]
    name = cached_dataset(offline_hub, "acme/levels", {"train": rows}, config="hard")
    file = load_examples(str(write_jsonl(tmp_path / "rows.jsonl", rows)), fields=FieldOptions(prompt_field="question", answer_field="meta.level"))
    by_name = load_examples(name + ":hard", fields=FieldOptions(prompt_field="question", answer_field="meta.level"))
    assert [(e.row, e.messages, e.answer) for e in by_name] == [(e.row, e.messages, e.answer) for e in file]
    assert by_name[2].answer == "2"
    with pytest.raises(OpcdError, match=r"^cannot read data hf:acme/levels:easy: .*config 'easy'.*\['hard'\]"):
        load_examples(name + ":easy")
    with pytest.raises(OpcdError, match=r"^hf:acme/levels:hard row 1: --answer-field meta\.nope: meta has no 'nope' \(its keys: level\)$"):
        load_examples(name + ":hard", fields=FieldOptions(prompt_field="question", answer_field="meta.nope"))


def test_a_folder_in_a_hub_repositorys_layout(tmp_path):
    import datasets

    repo = tmp_path / "arith"
    (repo / "data").mkdir(parents=True)
    for split, rows in (("train", TRAIN), ("test", TEST)):
        datasets.Dataset.from_list(rows).to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    assert prompts(load_examples(f"hf:{repo}")) == [("1+1?", "2"), ("2+2?", "4")]
    assert prompts(load_examples(f"hf:{repo}", role="eval")) == [("3+3?", "6")]
    assert hub_data.local_folder(f"hf:{repo}") == str(repo) and hub_data.local_folder("hf:acme/x") is None


def test_not_cached_is_one_line_offline_and_when_the_hub_cannot_be_reached(offline_hub, monkeypatch):
    import datasets.config

    cached = cached_dataset(offline_hub, "acme/here", {"train": TRAIN})
    with pytest.raises(OpcdError, match=r"^hf:acme/gone is not in the Hugging Face datasets cache \(.*\) and "
                                        r"HF_DATASETS_OFFLINE is set; load it once"):
        load_examples("hf:acme/gone")
    # no offline mode asked for, and no hub: the cache alone is read, and offline mode is put back as it was
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    asked = []
    monkeypatch.setattr("opcd_cli.models.hub_reachable", lambda endpoint, seconds=4.0: asked.append(endpoint) or False)
    assert prompts(load_examples(cached)) == [("1+1?", "2"), ("2+2?", "4")]
    with pytest.raises(OpcdError, match=r"^hf:acme/gone is not in .* and the hub cannot be reached"):
        load_examples("hf:acme/gone")
    assert len(asked) == 2 and datasets.config.HF_HUB_OFFLINE is False


def test_a_broken_cache_is_one_line(offline_hub):
    name = cached_dataset(offline_hub, "acme/broken", {"train": TRAIN})
    next(offline_hub.glob("acme___broken/*/*/*/broken-train.arrow")).write_bytes(b"not arrow")
    with pytest.raises(OpcdError, match=r"^cannot read data hf:acme/broken: ") as caught:
        load_examples(name)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["hf:", "hf:a/b/c", "hf:acme/x:", "hf:acme/x:a:b", "hf:-x/y", "hf:acme/x y"])
def test_a_malformed_name_is_one_line(name):
    with pytest.raises(OpcdError, match=r"is not a dataset name: write hf:ORG/NAME, hf:ORG/NAME:CONFIG or hf:FOLDER"):
        hub_data.parse(name)


def test_a_split_for_no_dataset_by_name_is_refused():
    with pytest.raises(OpcdError, match=r"^--split test chooses the split of a dataset by name \(--data hf:ORG/NAME\)"):
        DistillConfig(student="s", data="rows.jsonl", context="c.txt", split="test")
    with pytest.raises(OpcdError, match=r"--eval-split dev .*\(--eval-data or --ood-data hf:ORG/NAME\)"):
        DistillConfig(student="s", data="hf:a/b", context="c.txt", eval_data="t.jsonl", eval_split="dev")
    with pytest.raises(OpcdError, match="^--eval-split does not apply to this command; use --split$"):
        EvalConfig(models=("m",), data="hf:a/b", fields=FieldOptions(eval_split="dev"))
    with pytest.raises(OpcdError, match=r"--eval-split dev .*\(--val hf:ORG/NAME\)"):
        ExtractConfig(model="m", data="hf:a/b", val="v.jsonl", fields=FieldOptions(eval_split="dev"))
    with pytest.raises(OpcdError, match="--split is empty"):
        FieldOptions(split=" ")
    DistillConfig(student="s", data="rows.jsonl", context="c.txt", eval_data="hf:a/b", eval_split="dev")
    EvalConfig(models=("m",), data="rows.jsonl", ood_data="hf:a/b", fields=FieldOptions(split="ood"))


def test_eval_and_distill_read_datasets_by_name(cli, offline_hub, tmp_path):
    """``opcd eval`` scores the same rows by name as from their file; ``opcd distill`` trains on a dataset by name
    and scores another split of it, and records the rows it read in its run folder."""
    from opcd_cli import sources

    splits = {"train": sources.rows("toy:codes/train")[:8], "test": sources.rows("toy:codes/test")[:6]}
    name = cached_dataset(offline_hub, "acme/codes", splits)
    file = write_jsonl(tmp_path / "test.jsonl", splits["test"])
    scored, said = [], []
    for data in (name, file):
        code, stdout, stderr = cli("eval", "--model", "toy:small", "--data", data, "--context", "toy:codes/context",
                                   "--json")
        assert code == 0, stderr
        scored.append(json.loads(stdout))
        said.append(stderr)
    assert "data hf:acme/codes: split test (6 rows; splits train, test)" in said[0] and "split" not in said[1]
    assert scored[0]["n"] == scored[1]["n"] == 6
    assert {k: v for k, v in scored[0].items() if k != "data"} == {k: v for k, v in scored[1].items() if k != "data"}

    code, stdout, stderr = cli("distill", "--student", "toy:small", "--data", name, "--context", "toy:codes/context",
                               "--eval-data", name, "--steps", "1", "--batch-size", "2", "--topk", "4",
                               "--max-new-tokens", "4", "--show-prompts", "0", "-o", tmp_path / "run", "--json")
    assert code == 0, stderr
    assert "data hf:acme/codes: split train (8 rows" in stderr and "eval data hf:acme/codes: split test (6 rows" in stderr
    recorded = tmp_path / "run" / "data"
    assert [json.loads(line)["prompt"] for line in (recorded / "train.jsonl").read_text().splitlines()] == \
        [r["prompt"] for r in splits["train"]]
    assert len((recorded / "test.jsonl").read_text().splitlines()) == 6
    config = json.loads((tmp_path / "run" / "opcd_config.json").read_text())
    assert config["data"] == name and config["split"] is None and config["eval_split"] is None


def test_data_preview_says_the_split_it_read(cli, offline_hub):
    name = cached_dataset(offline_hub, "acme/arith", {"train": TRAIN, "test": TEST})
    code, stdout, stderr = cli("data", "preview", name, "--split", "test", "--json")
    assert code == 0, stderr
    shown = json.loads(stdout)
    assert shown["split"] == "test" and shown["rows"] == 1 and shown["shown"][0]["prompt"] == "3+3?"
    assert "hf:acme/arith (split test): 1 rows, read as plain columns" in " ".join(stderr.split())
    code, _, stderr = cli("data", "preview", name, "--split", "dev")
    assert code == 2 and "has no split 'dev'; its splits are train, test: give one with --split" in stderr


def test_accuracy_is_also_reported_by_data_source(cli, tmp_path):
    """verl rows keep their ``data_source``: it is written back with the row and ``opcd eval`` reports accuracy
    per source beside the overall one."""
    from opcd_cli import sources

    rows = [dict(r, data_source="easy" if i < 4 else "hard") for i, r in enumerate(sources.rows("toy:codes/test")[:6])]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    examples = load_examples(str(data))
    assert [e.source for e in examples] == ["easy"] * 4 + ["hard"] * 2
    assert examples[0].to_record()["data_source"] == "easy"
    code, stdout, stderr = cli("eval", "--model", "toy:small", "--data", data, "--context", "toy:codes/context", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    by_source, with_context = result["accuracy_by_source"], result["accuracy_with_context_by_source"]
    assert set(by_source) == set(with_context) == {"easy", "hard"}
    assert (4 * by_source["easy"] + 2 * by_source["hard"]) / 6 == pytest.approx(result["accuracy"])
    assert (4 * with_context["easy"] + 2 * with_context["hard"]) / 6 == pytest.approx(result["accuracy_with_context"])
    assert "accuracy by data_source" in stderr
