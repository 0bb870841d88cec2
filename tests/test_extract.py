"""`opcd extract`: the text helpers, bad input, and the experiential pipeline on the toy world."""

import json

import pytest

from conftest import tree, write_jsonl
from opcd_cli.experience import add_items, is_near_duplicate, parse_items, render_items, trace_line
from opcd_cli.extract import within_budget
from opcd_cli.toy.tokenizer import build_tokenizer


def test_items_are_parsed_from_their_lines_only():
    text = "Thinking...\n- EXPERIENCE ITEM: k-words have code K7\n  - experience item:  check the units  \nnot an item"
    assert parse_items(text) == ["k-words have code K7", "check the units"]
    assert parse_items(render_items(["a b", "c"])) == ["a b", "c"]


def test_near_duplicates_are_dropped_but_different_facts_kept():
    assert is_near_duplicate("Check the units twice", ["check the units twice."])
    assert not is_near_duplicate("k-words have code K7", ["k-words have code K3"])
    assert add_items(["k-words have code K7"], ["k-words have code K7", "m-words have code M1", "M-words have code M1"]) == [
        "k-words have code K7", "m-words have code M1"]


def test_budget_drops_whole_items_oldest_first():
    tok = build_tokenizer()
    items = ["first item here", "second item", "third"]
    full = len(tok(render_items(items), add_special_tokens=False)["input_ids"])
    assert within_budget(items, tok, full) == items
    assert within_budget(items, tok, full - 1) == ["second item", "third"]
    assert within_budget(items, tok, 1) == []


def test_trace_line_shows_prompt_answer_and_verdict():
    assert trace_line("Code of kip?", " k-words have\ncode K7\n", True) == "[right] Code of kip? -> k-words have code K7"
    assert trace_line("2+2?", "5", False) == "[wrong] 2+2? -> 5"


@pytest.fixture
def problems(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    rows = [{"prompt": "Code of kip?", "answer": "7"}, {"prompt": "Code of mud?", "answer": "1"}]
    return {
        "train": write_jsonl(folder / "train.jsonl", rows),
        "val": write_jsonl(folder / "val.jsonl", rows),
        "val_no_answers": write_jsonl(folder / "val_q.jsonl", [{"prompt": "Code of kip?"}]),
        "no_items": folder / "exp.txt",
        "bad_template": folder / "template.txt",
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tiny_student, problems, tmp_path):
    problems["no_items"].write_text("Be careful.\n")
    problems["bad_template"].write_text("Here are attempts: TRACES\n")
    base = ["extract", "--model", tiny_student, "--data", problems["train"], "--val", problems["val"],
            "-o", tmp_path / "out" / "exp.txt"]
    cases = [
        (["--experience", problems["no_items"]], "has no `- EXPERIENCE ITEM:` lines"),
        (["--template", problems["bad_template"]], "no {traces} placeholder"),
        (["--val", problems["val_no_answers"]], "row 1 has no `answer`"),
        (["--rounds", "0"], "rounds must be"),
        (["--data", tmp_path / "missing.jsonl"], "does not exist"),
    ]
    for extra, message in cases:
        args = list(base)
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        before = tree(tmp_path)
        code, out, err = cli(*args)
        assert code == 2, (extra, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (extra, err)
        assert tree(tmp_path) == before and out == ""


def test_model_without_data_is_refused(cli, tiny_student):
    code, _, err = cli("extract", "--model", tiny_student)
    assert code == 2 and "--model, --data and --val together" in err


def test_negative_consistency_weight_is_refused(cli, tmp_path):
    code, _, err = cli("distill", "--consistency-weight", "-0.5", "-o", tmp_path / "run")
    assert code == 2 and "consistency_weight must be" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_toy_extraction_finds_the_law_and_distillation_internalises_it(cli, tmp_path):
    """The README's experiential pipeline: extract on the toy world, distil the result, evaluate."""
    exp = tmp_path / "exp.txt"
    code, out, err = cli("extract", "-o", exp, "--rounds", "2", "--json")
    assert code == 0, err
    summary = json.loads(out)
    items = parse_items(exp.read_text())
    assert summary["items"] == len(items) > 0
    assert summary["val_accuracy_best"] > summary["val_accuracy_without"] + 0.2
    assert (tmp_path / "exp.rounds" / "round-1.txt").is_file() and (tmp_path / "exp.rounds" / "round-2.txt").is_file()

    from opcd_cli.toy import world

    splits = world.splits("codes")  # the toy recipe's run, scored on fewer rows
    test = write_jsonl(tmp_path / "test.jsonl", splits.test[:60])
    ood = write_jsonl(tmp_path / "ood.jsonl", splits.ood[:20])
    run = tmp_path / "run"
    code, out, err = cli("distill", "--toy-task", "codes", "--context", exp, "--eval-data", test, "--ood-data", ood,
                         "-o", run, "--json")
    assert code == 0, err
    distilled = json.loads(out)
    assert distilled["context_file"] == str(exp)
    assert distilled["after"]["accuracy"] > distilled["before"]["accuracy"] + 0.2


def test_overwrite_replaces_every_round_file(cli, tiny_student, tmp_path):
    """A one-round extraction over a two-round one leaves one round file, not a stale second one beside it."""
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "kip", "answer": "K7"}, {"prompt": "mud", "answer": "M1"}])
    seed = tmp_path / "seed.txt"
    seed.write_text("- EXPERIENCE ITEM: k-words have code K7\n")
    base = ["extract", "--model", tiny_student, "--data", rows, "--val", rows, "--experience", seed, "--attempts", "1",
            "--max-new-tokens", "2", "--extract-max-new-tokens", "2", "-o", tmp_path / "exp.txt", "--json"]
    code, out, err = cli(*base, "--rounds", "2")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "exp.rounds").iterdir()) == ["round-1.txt", "round-2.txt", "summary.json"]
    code, out, err = cli(*base, "--rounds", "1", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "exp.rounds").iterdir()) == ["round-1.txt", "summary.json"]
    assert len(json.loads((tmp_path / "exp.rounds" / "summary.json").read_text())["rounds"]) == 1
    assert "k-words have code K7" in (tmp_path / "exp.txt").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
