"""Rows (prompts, contexts, answers): loading them, the helpers on them, and writing them back.

Rows come from JSONL, JSON, CSV, Parquet, a saved ``datasets`` folder, or a built-in name (``toy:codes/test``,
``sources.py``). Each has ``prompt`` (a string) or ``messages`` (a chat: a list of ``{"role", "content"}``
ending with the user's turn), and optionally ``context`` (its own context, which wins over ``--context``),
``answer``, ``verifier`` (which verifier scores it; see ``verifiers.py``) and ``data_source`` (where the row
comes from: accuracy is reported by it too); rows in the formats of TRL,
ms-swift, verl and plain ``question``/``answer`` columns are read into this form (``row_formats.py``). A run
writes the rows it used back as JSONL (``jsonl_text``), in opcd's own form.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import hub_data, sources
from .errors import OpcdError, first_line
from .row_formats import NATIVE, RowError, RowFormat, recognise
from .verifiers import VERIFIERS

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Example:
    row: int  # 1-based row (line for JSONL) in the source, for messages
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, the last one the user's
    context: str | None = None
    answer: str | None = None
    verifier: str | None = None
    source: str | None = None  # the row's data_source (verl, the official code): accuracy is also reported by it

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
        if self.source is not None:
            record["data_source"] = self.source
        return record


def require_answers(examples: list[Example], path: str, why: str = "evaluation needs an answer for every row") -> None:
    missing = next((e for e in examples if e.answer is None), None)
    if missing is not None:
        raise OpcdError(f"{path} row {missing.row} has no `answer`; {why}")


def has_context(examples: list[Example], context: str | None) -> bool:
    return context is not None or any(e.context for e in examples)


def strip_contexts(examples: list[Example]) -> list[Example]:
    return [dataclasses.replace(e, context=None) for e in examples]


ROLES = ("system", "user", "assistant")


def read_context(path: str | None) -> str | None:
    """The shared context: a file's text, standard input for ``-``, or a built-in text. Never truncated; empty
    or non-UTF-8 text is an error."""
    if path is None:
        return None
    if sources.is_builtin(path):
        return sources.text(path).strip("\n")
    if path == "-":
        where = "standard input"
        data = getattr(sys.stdin, "buffer", None)
        text = decode(data.read(), where) if data is not None else sys.stdin.read()
    else:
        file = Path(path)
        where = f"context file {path}"
        if file.is_dir():
            raise OpcdError(f"{where} is a directory; give a text file (or - for standard input)")
        if not file.is_file():
            raise OpcdError(f"{where} does not exist")
        text = read_text(file, where)
    if not text.strip():
        raise OpcdError(f"{where} is empty: give the system prompt or experience items to distil")
    return text.strip("\n")


def decode(data: bytes, where: str) -> str:
    """UTF-8 text, or a one-line error saying where the bytes came from and where they stop being UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpcdError(f"{where} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                        "convert it to UTF-8") from None


def read_text(file: Path, where: str) -> str:
    try:
        return decode(file.read_bytes(), where)
    except OSError as e:
        raise OpcdError(f"cannot read {where}: {e.strerror or e}") from None


@dataclass(frozen=True)
class Rows:
    """A source's rows as opcd reads them, and the format they were read as."""

    form: RowFormat
    examples: list[Example]
    split: str | None = None  # the split read, for a dataset by name


# what rows are for -> (the FieldOptions setting naming an hf: dataset's split, its flag, the usual split's role)
SPLIT_OF = {"train": ("split", "--split", "train"), "eval": ("eval_split", "--eval-split", "eval"),
            "scored": ("split", "--split", "eval")}  # scored: opcd eval's own --data


def load_examples(path: str, *, what: str = "data", say: Callable[[str], None] | None = None,
                  fields=None, role: str = "train") -> list[Example]:
    """Rows of a data file, a saved dataset, a dataset by name (``hf:``, ``hub_data.py``) or a built-in name,
    checked; raises ``OpcdError`` naming the first bad row (by its line in a JSONL file). Rows in another tool's
    format (``row_formats.py``), or mapped by ``fields`` (a ``FieldOptions``), are read into opcd's own, and
    ``say`` is told which format, once. ``role`` (``SPLIT_OF``) says which split of an ``hf:`` dataset to read."""
    return load_rows(path, what=what, say=say, fields=fields, role=role).examples


def load_rows(path: str, *, what: str = "data", say: Callable[[str], None] | None = None, fields=None,
              role: str = "train") -> Rows:
    """``load_examples``, keeping the format the rows were read as."""
    split = None
    if sources.is_builtin(path):
        numbered = list(enumerate(sources.rows(path), 1))
    elif hub_data.is_hub_name(path):
        setting, flag, usual = SPLIT_OF[role]
        records, split = hub_data.read(path, what=what, split=getattr(fields, setting, None), role=usual,
                                       split_flag=flag, say=say)
        numbered = list(enumerate(records, 1))
    else:
        numbered = _read_records(path, what)
    if not numbered:
        raise OpcdError(f"{what} file {path} has no rows")
    line_of = "line" if str(path).endswith(".jsonl") else "row"
    form = recognise(numbered[0][1], fields)
    if form.name != NATIVE and say is not None:
        say(form.describe(what, str(path)))
    return Rows(form, [_to_example(_read(form, record, f"{path} {line_of} {number}"), number, str(path), line_of)
                       for number, record in numbered], split)


def _read(form, record, where: str):
    """A record in opcd's own form, as its file's format reads it; a mapping that does not fit names the row."""
    if not isinstance(record, dict):
        return record
    try:
        return form.read(record)
    except RowError as e:
        raise OpcdError(f"{where}: {e}") from None


def examples_from_records(records: list[dict], path: str, what: str = "data") -> list[Example]:
    if not records:
        raise OpcdError(f"{what} {path} has no rows")
    return [_to_example(record, i + 1, str(path), "row") for i, record in enumerate(records)]


def _read_records(path: str, what: str) -> list[tuple[int, dict]]:
    """(line or row number, record) pairs of a file or a saved dataset folder."""
    source = Path(path)
    if not source.exists():
        raise OpcdError(f"{what} file {path} does not exist")
    if source.is_dir():
        return list(enumerate(_read_saved_dataset(source, what), 1))
    fmt = FORMATS.get(source.suffix.lower())
    if fmt is None:
        raise OpcdError(f"{what} file {path}: unknown format {source.suffix!r}; use .jsonl, .json, .csv, .parquet or a saved dataset folder")
    if source.stat().st_size == 0:
        raise OpcdError(f"{what} file {path} is empty")
    if source.suffix.lower() == ".jsonl":
        return _read_jsonl(source, what)
    if fmt == "json":
        return list(enumerate(_read_json(source, what), 1))
    if fmt == "csv":
        return list(enumerate(_read_csv(source, what), 1))
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        table = datasets.load_dataset(fmt, data_files=str(source), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise OpcdError(f"cannot read {what} file {path}: {first_line(e)}") from None
    return list(enumerate(table.to_list(), 1))


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


def _read_jsonl(source: Path, what: str) -> list[tuple[int, dict]]:
    """Each non-blank line as an object, numbered by its line in the file."""
    records = []
    for number, line in enumerate(read_text(source, f"{what} file {source}").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise OpcdError(f"{what} file {source} line {number} is not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(value, dict):
            raise OpcdError(f"{what} file {source} line {number} is not a JSON object")
        records.append((number, value))
    if not records:
        raise OpcdError(f"{what} file {source} has no rows")
    return records


def _read_json(source: Path, what: str) -> list[dict]:
    try:
        value = json.loads(read_text(source, f"{what} file {source}"))
    except json.JSONDecodeError as e:
        raise OpcdError(f"{what} file {source} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise OpcdError(f"{what} file {source} must hold a JSON list of objects (or use JSONL, one object per line)")
    return value


def _read_csv(source: Path, what: str) -> list[dict]:
    """Every column as the text it is (``007`` stays ``007``, ``1.50`` stays ``1.50``); an empty cell is no value."""
    import csv
    import io

    text = read_text(source, f"{what} file {source}").removeprefix("\ufeff")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        for record in reader:
            if None in record:
                raise OpcdError(f"{what} file {source} row {len(rows) + 1} has more cells than the header has columns "
                                f"({', '.join(reader.fieldnames)})")
            rows.append({key: value for key, value in record.items() if value not in (None, "")})
    except csv.Error as e:
        raise OpcdError(f"cannot read {what} file {source}: {e}") from None
    if not rows:
        raise OpcdError(f"{what} file {source} has no rows")
    return rows


def _to_example(record: dict, row: int, path: str, line_of: str) -> Example:
    where = f"{path} {line_of} {row}"
    if not isinstance(record, dict):
        raise OpcdError(f"{where} is not an object with a `prompt` or `messages` field")
    verifier = _optional_text(record, "verifier", where)
    if verifier is not None and verifier not in VERIFIERS:
        raise OpcdError(f"{where}: unknown verifier {verifier!r}; use one of {', '.join(VERIFIERS)}")
    return Example(
        row=row,
        messages=_messages(record, where),
        context=_optional_text(record, "context", where) or None,
        answer=_optional_text(record, "answer", where),
        verifier=verifier,
        source=_optional_text(record, "data_source", where),
    )


def _kind(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def _messages(record: dict, where: str) -> tuple[tuple[str, str], ...]:
    prompt, messages = record.get("prompt"), record.get("messages")
    if prompt is not None and messages is not None:
        raise OpcdError(f"{where} has both `prompt` and `messages`; keep one")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise OpcdError(f"{where}: `prompt` must be a string; got {_kind(prompt)} ({json.dumps(prompt)[:40]})")
        if not prompt.strip():
            raise OpcdError(f"{where}: `prompt` is empty")
        return (("user", prompt),)
    if messages is None:
        raise OpcdError(f"{where} has no `prompt` or `messages` field (found: {', '.join(record) or 'nothing'})")
    if not isinstance(messages, list) or not messages:
        raise OpcdError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise OpcdError(f"{where}: every message needs a string `role` and `content`")
        if m["role"] not in ROLES:
            raise OpcdError(f"{where}: message {i + 1} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if m["role"] == "system" and i > 0:
            raise OpcdError(f"{where}: message {i + 1} is a system message; only the first message may be one")
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
        raise OpcdError(f"{where}: `{key}` must be a string; got {_kind(value)}")
    return value


def jsonl_text(examples: list[Example]) -> str:
    """Rows as JSONL, one object a line, in the form they are read in."""
    return "".join(json.dumps(e.to_record(), ensure_ascii=False) + "\n" for e in examples)

