import json

import pytest

from opcd_cli.data import load_examples, read_context
from opcd_cli.errors import OpcdError

ROWS = [
    {"prompt": "abc", "answer": "cba"},
    {"prompt": "xyz", "context": "Reply backwards.", "answer": 7},
]


def _write(tmp_path, fmt):
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        path.write_text("prompt,context,answer\nabc,,cba\nxyz,Reply backwards.,7\n")
    elif fmt == "parquet":
        import datasets

        datasets.Dataset.from_list([{**r, "answer": str(r["answer"]), "context": r.get("context")} for r in ROWS]).to_parquet(str(path))
    elif fmt == "saved":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list([{**r, "answer": str(r["answer"]), "context": r.get("context")} for r in ROWS]).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "saved"])
def test_every_format_gives_the_same_examples(tmp_path, fmt):
    examples = load_examples(_write(tmp_path, fmt))
    assert [e.prompt for e in examples] == ["abc", "xyz"]
    assert [e.answer for e in examples] == ["cba", "7"]
    assert [e.context for e in examples] == [None, "Reply backwards."]


def test_messages_field(tmp_path):
    path = tmp_path / "chat.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"messages": chat}) + "\n")
    (example,) = load_examples(str(path))
    assert example.messages == (("system", "Be brief."), ("user", "hi"))


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a"}\n{"prompt": "b",\n', "line 2 is not valid JSON"),
        ('{"prompt": "a"}\n{"question": "b"}\n', "line 2 has no `prompt` or `messages` field"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n', "last message must be the user's"),
        ('["a"]\n', "line 1 is not a JSON object"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(OpcdError, match=message):
        load_examples(str(path))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", "is empty"),
        ("blank.jsonl", "\n\n", "has no rows"),
        ("rows.txt", "abc", "unknown format"),
        ("obj.json", '{"prompt": "a"}', "JSON list of objects"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(OpcdError, match=message):
        load_examples(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(OpcdError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_context_file(tmp_path, monkeypatch):
    path = tmp_path / "ctx.txt"
    path.write_text("- EXPERIENCE ITEM: a\n- EXPERIENCE ITEM: b\n\n")
    assert read_context(str(path)) == "- EXPERIENCE ITEM: a\n- EXPERIENCE ITEM: b"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(OpcdError, match="is empty"):
        read_context(str(tmp_path / "empty.txt"))
    with pytest.raises(OpcdError, match="does not exist"):
        read_context(str(tmp_path / "none.txt"))
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    assert read_context("-") == "from stdin"


def test_long_context_is_kept_whole(tmp_path):
    text = "x" * 200_000
    (tmp_path / "long.txt").write_text(text)
    assert read_context(str(tmp_path / "long.txt")) == text


def test_csv_columns_are_read_as_the_text_they_are(tmp_path):
    """No column types guessed: `007` stays `007` and `1.50` stays `1.50`; an empty cell is no value."""
    from opcd_cli.data import load_examples

    path = tmp_path / "rows.csv"
    path.write_text("prompt,answer,context\nCode of kip?,007,\nHalf of three?,1.50,lessons\n\"a, b\",1e3,\n")
    rows = load_examples(str(path))
    assert [(e.prompt, e.answer, e.context) for e in rows] == [
        ("Code of kip?", "007", None), ("Half of three?", "1.50", "lessons"), ("a, b", "1e3", None)]
