"""Rows in the formats of the tools people come from (TRL, ms-swift, verl and the official OPCD code, plain
question/answer columns) read into the same examples as opcd's own rows, from every file kind; the format is
said once; and a toy run trains on a TRL-conversational and a verl-layout Parquet file."""

from __future__ import annotations

import json

import pytest

from opcd_cli.data import load_examples
from opcd_cli.errors import OpcdError

from conftest import cached_dataset, write_jsonl

ROWS = [  # opcd's own form: what every format below must read as
    {"prompt": "What is 2 + 2?", "context": "Add carefully.", "answer": "4"},
    {"prompt": "Name a colour.", "context": "Be brief.", "answer": "red"},
]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


FORMATS = {  # name: (rows in that format, the line said, the fields the plain equivalent has)
    "TRL conversational": ([{"prompt": chat(r["prompt"]) + [{"role": "assistant", "content": "ref"}],
                             "privileged_context": r["context"], "answer": r["answer"], "completion": "x"}
                            for r in ROWS],
                           "prompt (messages) without its last assistant turn, privileged_context -> context, "
                           "completion ignored", ("prompt", "context", "answer")),
    "TRL": ([{"prompt": r["prompt"], "privileged_context": r["context"], "answer": r["answer"]} for r in ROWS],
            "prompt, privileged_context -> context", ("prompt", "context", "answer")),
    "ms-swift": ([{"messages": chat(r["prompt"]) + [{"role": "assistant", "content": "ref"}],
                   "teacher_prompt": r["context"], "answer": r["answer"]} for r in ROWS],
                 "messages without its last assistant turn, teacher_prompt -> context", ("prompt", "context", "answer")),
    "verl": ([{"prompt": chat(r["prompt"]), "reward_model": {"style": "rule", "ground_truth": r["answer"]},
               "data_source": "toy", "answer": "ignored"} for r in ROWS],
             "prompt (messages), reward_model.ground_truth -> answer", ("prompt", "answer")),
    "verl (official, content)": ([{"content": chat(r["prompt"]), "data_source": "toy", "answer": r["answer"]}
                                  for r in ROWS], "content (messages), answer -> answer", ("prompt", "answer")),
    "verl (official system-prompt rows)": ([{"content": chat(r["prompt"]), "answer": r["answer"]} for r in ROWS],
                                           "content (messages), answer -> answer", ("prompt", "answer")),
    "plain columns": ([{"question": r["prompt"], "solution": r["answer"]} for r in ROWS],
                      "question -> prompt, solution -> answer", ("prompt", "answer")),
}


def write(kind: str, folder, rows: list[dict], cache=None) -> str:
    if kind == "jsonl":
        return str(write_jsonl(folder / "rows.jsonl", rows))
    if kind == "json":
        (folder / "rows.json").write_text(json.dumps(rows))
        return str(folder / "rows.json")
    import datasets

    table = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        table.to_parquet(str(folder / "rows.parquet"))
        return str(folder / "rows.parquet")
    if kind == "hub":  # a dataset by name, in the datasets cache
        return cached_dataset(cache, f"acme/{folder.name}", {"train": rows})
    table.save_to_disk(str(folder / "saved"))
    return str(folder / "saved")


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "saved", "hub"])
def test_every_format_reads_as_its_plain_equivalent(tmp_path, kind, request):
    cache = request.getfixturevalue("offline_hub") if kind == "hub" else None
    for name, (rows, said, fields) in FORMATS.items():
        folder = tmp_path / name.replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
        folder.mkdir()
        plain = load_examples(str(write_jsonl(folder / "plain.jsonl", [{k: r[k] for k in fields} for r in ROWS])))
        heard = []
        got = load_examples(write(kind, folder, rows, cache), say=heard.append)
        assert [(e.messages, e.context, e.answer) for e in got] == [(e.messages, e.context, e.answer) for e in plain], name
        assert f"rows read as {name.split(' (')[0]}: {said}" in heard[-1], (name, heard)
        assert len(heard) == (2 if kind == "hub" else 1), heard  # and, by name, the split read


def test_opcds_own_rows_are_read_as_they_are_and_nothing_is_said(tmp_path):
    heard = []
    got = load_examples(str(write_jsonl(tmp_path / "own.jsonl", ROWS)), say=heard.append)
    assert heard == [] and got[0].prompt == "What is 2 + 2?" and got[0].context == "Add carefully."


def test_a_row_that_does_not_fit_its_files_format_names_itself(tmp_path):
    rows = [{"prompt": chat("fine"), "privileged_context": "c"}, {"prompt": [{"role": "user"}], "privileged_context": "c"}]
    with pytest.raises(OpcdError, match=r"rows.jsonl line 2: every message needs a string `role` and `content`"):
        load_examples(str(write_jsonl(tmp_path / "rows.jsonl", rows)))
    verl = [{"prompt": chat("q"), "reward_model": {"ground_truth": ["a", "b"]}, "data_source": "d"}]
    with pytest.raises(OpcdError, match=r"line 1: `answer` must be a string; got a list"):
        load_examples(str(write_jsonl(tmp_path / "verl.jsonl", verl)))


def test_distill_trains_on_trl_conversational_and_verl_parquet(cli, tmp_path):
    import datasets

    from opcd_cli import sources

    rows, context = sources.rows("toy:codes/train")[:8], sources.text("toy:codes/context").strip("\n")
    trl = [{"prompt": chat(r["prompt"]), "privileged_context": context} for r in rows]
    verl = [{"prompt": chat(r["prompt"]), "reward_model": {"ground_truth": r.get("answer", "")},
             "data_source": "toy"} for r in rows]
    for name, table, extra in (("trl", trl, []), ("verl", verl, ["--context", "toy:codes/context"])):
        datasets.Dataset.from_list(table).to_parquet(str(tmp_path / f"{name}.parquet"))
        code, stdout, stderr = cli("distill", "--student", "toy:small", "--data", tmp_path / f"{name}.parquet", *extra,
                                   "--steps", "1", "--batch-size", "2", "--topk", "4", "--max-new-tokens", "4",
                                   "--show-prompts", "0", "-o", tmp_path / name, "--json")
        assert code == 0, stderr
        assert f"rows read as {'TRL conversational' if name == 'trl' else 'verl'}" in stderr
        summary = json.loads(stdout)
        assert summary["steps"] == 1 and summary["final_loss"] is not None
        written = (tmp_path / name / "data" / "train.jsonl").read_text().splitlines()
        assert len(written) == 8 and json.loads(written[0])["prompt"] == rows[0]["prompt"]  # opcd's own form


def test_eval_reads_rows_through_the_users_mapping(cli, tmp_path):
    """A multiple-choice set in its own columns (MedMCQA's layout), written into prompts by a template and its
    answer by a choice letter, from the flags and from a recipe."""
    rows = [{"question": f"Which is {i}?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": i % 4,
             "meta": {"subject": "toy"}} for i in range(3)]
    data = write_jsonl(tmp_path / "mcq.jsonl", rows)
    template = "{question}\nA) {opa}\nB) {opb}\nC) {opc}\nD) {opd}"
    code, stdout, stderr = cli("eval", "--model", "toy:small", "--data", data, "--prompt-template", template,
                               "--answer-template", "{cop:letter}", "--max-new-tokens", "2", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["n"] == 3
    assert "rows read as your mapping: {question}\\nA) {opa}" in stderr and "{cop:letter} -> answer" in stderr
    recipe = tmp_path / "mcq.toml"
    recipe.write_text(f"prompt_template = {json.dumps(template)}\nanswer_field = \"meta.subject\"\n")
    code, stdout, stderr = cli("eval", "--model", "toy:small", "--data", data, "--recipe", recipe,
                               "--max-new-tokens", "2", "--json")
    assert code == 0 and "meta.subject -> answer" in stderr, stderr

    from opcd_cli.config import FieldOptions

    got = load_examples(str(data), fields=FieldOptions(prompt_template=template, answer_template="{cop:letter}"))
    assert [e.answer for e in got] == ["A", "B", "C"] and got[1].prompt.startswith("Which is 1?\nA) a\nB) b")
    assert load_examples(str(data), fields=FieldOptions(prompt_field="question", answer_field="meta.subject"))[0] \
        .messages == (("user", "Which is 0?"),)


def test_data_preview_shows_how_rows_are_read_and_rendered(cli, tmp_path):
    rows, said, _ = FORMATS["TRL conversational"]
    data = write("parquet", tmp_path, rows)
    code, stdout, stderr = cli("data", "preview", data, "--rows", "1", "--model", "toy:small", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["format"] == "TRL conversational" and result["mapping"].startswith(said) and result["rows"] == 2
    shown = result["shown"]
    assert len(shown) == 1 and shown[0]["prompt"] == ROWS[0]["prompt"] and shown[0]["context"] == ROWS[0]["context"]
    assert ROWS[0]["context"] in shown[0]["rendered"] and ROWS[0]["prompt"] in shown[0]["rendered"]
    assert "read as TRL conversational" in stderr and "What is 2 + 2?" in stderr  # the table, on stderr
    code, _, stderr = cli("data", "preview", data, "--rows", "0")
    assert code == 2 and stderr.strip().splitlines() == ["opcd: error: --rows must be at least 1; got 0"]
    code, _, stderr = cli("data", "preview", data, "--prompt-template", "{question}")
    assert code == 2 and "--prompt-template names the column 'question'" in stderr and "Traceback" not in stderr
