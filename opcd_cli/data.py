"""Rows (prompts, contexts, answers): loading them, the helpers on them, and writing them back.

Rows come from JSONL, JSON, CSV, Parquet, a saved ``datasets`` folder, or a built-in name (``toy:codes/test``,
``sources.py``). Each has ``prompt`` (a string) or ``messages`` (a chat: a list of ``{"role", "content"}``
ending with the user's turn), and optionally ``context`` (its own context, which wins over ``--context``),
``answer`` and ``verifier`` (which verifier scores it; see ``verifiers.py``). A run writes the rows it used
back as JSONL (``write_jsonl``), in the same form.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from . import sources
from .errors import OpcdError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Example:
    row: int  # 1-based row (line for JSONL) in the source, for messages
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, the last one the user's
    context: str | None = None
    answer: str | None = None
    verifier: str | None = None

    @property
    def prompt(self) -> str:
        return self.messages[-1][1]

    def to_record(self) -> dict:
        """The row as a JSON object, in the form it is read in (``prompt`` for a single user turn)."""
        if len(self.messages) == 1:
            record = {"prompt": self.prompt}
        else:
            record = {"messages": [{"role": role, "content": content} for role, content in self.messages]}
        for key in ("context", "answer", "verifier"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        return record


def require_answers(examples: list[Example], path: str) -> None:
    missing = next((e for e in examples if e.answer is None), None)
    if missing is not None:
        raise OpcdError(f"{path} row {missing.row} has no `answer`; evaluation needs an answer for every row")


def has_context(examples: list[Example], context: str | None) -> bool:
    return context is not None or any(e.context for e in examples)


def strip_contexts(examples: list[Example]) -> list[Example]:
    return [dataclasses.replace(e, context=None) for e in examples]


def read_context(path: str | None) -> str | None:
    """The shared context: a file's text, or standard input for ``-``. Never truncated; empty is an error."""
    if path is None:
        return None
    if sources.is_builtin(path):
        return sources.text(path).strip("\n")
    if path == "-":
        text = sys.stdin.read()
        where = "standard input"
    else:
        file = Path(path)
        if not file.is_file():
            raise OpcdError(f"context file {path} does not exist")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise OpcdError(f"cannot read context file {path}: {e}") from None
        where = f"context file {path}"
    if not text.strip():
        raise OpcdError(f"{where} is empty: give the system prompt or experience items to distil")
    return text.strip("\n")


def load_examples(path: str, *, what: str = "data") -> list[Example]:
    """Rows of a data file, a saved dataset or a built-in name, checked; raises ``OpcdError`` naming the first
    bad row."""
    records = sources.rows(path) if sources.is_builtin(path) else _read_records(path, what)
    return examples_from_records(records, path, what)


def examples_from_records(records: list[dict], path: str, what: str = "data") -> list[Example]:
    if not records:
        raise OpcdError(f"{what} file {path} has no rows")
    line_of = "line" if str(path).endswith(".jsonl") else "row"
    return [_to_example(record, i + 1, str(path), line_of) for i, record in enumerate(records)]


def _read_records(path: str, what: str) -> list[dict]:
    source = Path(path)
    if not source.exists():
        raise OpcdError(f"{what} file {path} does not exist")
    if source.is_dir():
        return _read_saved_dataset(source, what)
    fmt = FORMATS.get(source.suffix.lower())
    if fmt is None:
        raise OpcdError(f"{what} file {path}: unknown format {source.suffix!r}; use .jsonl, .json, .csv, .parquet or a saved dataset folder")
    if source.stat().st_size == 0:
        raise OpcdError(f"{what} file {path} is empty")
    if source.suffix.lower() == ".jsonl":
        _check_jsonl(source, what)
    elif fmt == "json":
        _check_json(source, what)
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        table = datasets.load_dataset(fmt, data_files=str(source), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise OpcdError(f"cannot read {what} file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return table.to_list()


def _read_saved_dataset(folder: Path, what: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise OpcdError(f"{what} folder {folder} is not a saved dataset ({type(e).__name__}); give a file or a `save_to_disk` folder") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise OpcdError(f"{what} folder {folder} holds splits {', '.join(loaded)}; point at one split's folder")
        loaded = next(iter(loaded.values()))
    return loaded.to_list()


def _check_jsonl(source: Path, what: str) -> None:
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise OpcdError(f"{what} file {source} is not UTF-8 text: {e}") from None
    if not any(line.strip() for line in lines):
        raise OpcdError(f"{what} file {source} has no rows")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise OpcdError(f"{what} file {source} line {number} is not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(value, dict):
            raise OpcdError(f"{what} file {source} line {number} is not a JSON object")


def _check_json(source: Path, what: str) -> None:
    try:
        value = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpcdError(f"{what} file {source} is not valid JSON: {e}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise OpcdError(f"{what} file {source} must hold a JSON list of objects (or use JSONL, one object per line)")


def _to_example(record: dict, row: int, path: str, line_of: str) -> Example:
    where = f"{path} {line_of} {row}"
    messages = _messages(record, where)
    return Example(
        row=row,
        messages=messages,
        context=_optional_text(record, "context", where) or None,
        answer=_optional_text(record, "answer", where),
        verifier=_optional_text(record, "verifier", where),
    )


def _messages(record: dict, where: str) -> tuple[tuple[str, str], ...]:
    prompt, messages = record.get("prompt"), record.get("messages")
    if isinstance(prompt, str) and prompt.strip():
        return (("user", prompt),)
    if messages is None:
        raise OpcdError(f"{where} has no `prompt` or `messages` field (found: {', '.join(record) or 'nothing'})")
    if not isinstance(messages, list) or not messages:
        raise OpcdError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    pairs = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise OpcdError(f"{where}: every message needs a string `role` and `content`")
        pairs.append((m["role"], m["content"]))
    if pairs[-1][0] != "user":
        raise OpcdError(f"{where}: the last message must be the user's (the model answers it); found {pairs[-1][0]!r}")
    return tuple(pairs)


def _optional_text(record: dict, key: str, where: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise OpcdError(f"{where}: `{key}` must be a string")
    return value


def write_jsonl(path: Path, examples: list[Example]) -> None:
    """Rows as JSONL, one object a line, in the form they are read in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e.to_record(), ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
