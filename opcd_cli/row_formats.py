"""What a row's columns mean: the formats of the tools people come from, recognised by their columns, each
read into opcd's own row (``prompt`` or ``messages``, optional ``context``, ``answer`` and ``verifier``).

| format | recognised by | read as |
| --- | --- | --- |
| opcd's own, TRL standard | ``prompt`` (a string) or ``messages`` | as it is; TRL's ``privileged_context`` is the row's context |
| TRL conversational | ``prompt`` holding a list of messages | the messages (a trailing assistant turn dropped); ``privileged_context`` the context |
| ms-swift | ``messages`` with ``teacher_prompt`` | the messages (a trailing assistant turn dropped); ``teacher_prompt`` the context |
| verl, the official OPCD code | ``content`` messages, or ``prompt`` messages beside ``reward_model`` or ``data_source`` | the messages; ``reward_model.ground_truth`` (else ``answer``) the answer |
| plain columns | ``question`` or ``problem``, no ``prompt`` or ``messages`` | the prompt; ``answer`` or ``solution`` the answer |

A file's format is recognised from its first row and said once, in one line; every row is then read the
same way (a row that does not fit names itself, as opcd's own rows do).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable

from .errors import OpcdError

NATIVE = "opcd's own"
MAPPED = "your mapping"


@dataclass(frozen=True)
class RowFormat:
    """A recognised format: its name, how a record of it becomes opcd's own, and what it maps, in words."""

    name: str
    read: Callable[[dict], dict]
    mapping: str  # e.g. "prompt (messages), privileged_context -> context"

    def describe(self, what: str, path: str) -> str:
        return f"{what} {path}: rows read as {self.name}: {self.mapping}"


def recognise(record: Any, fields=None) -> RowFormat:
    """The format of a file whose first row is ``record`` (opcd's own when nothing else fits); the user's
    mapping (``fields``, a ``FieldOptions``) when one is given."""
    if fields is not None and fields.given:
        return mapped(fields)
    if not isinstance(record, dict):
        return RowFormat(NATIVE, _same, "")
    keys = set(record)
    if "teacher_prompt" in keys and "messages" in keys:
        return RowFormat("ms-swift", _ms_swift,
                         "messages" + _dropped(record["messages"]) + ", teacher_prompt -> context")
    prompt_key = next((k for k in ("prompt", "content") if _is_chat(record.get(k))), None)
    if prompt_key == "content" or prompt_key is not None and keys & {"reward_model", "data_source"}:
        answer = "reward_model.ground_truth" if isinstance(record.get("reward_model"), dict) else "answer"
        return RowFormat("verl", lambda r: _verl(r, prompt_key),
                         f"{prompt_key} (messages){_dropped(record[prompt_key])}, {answer} -> answer")
    if prompt_key == "prompt":
        return RowFormat("TRL conversational", _trl, "prompt (messages)" + _dropped(record["prompt"])
                         + (", privileged_context -> context" if "privileged_context" in keys else "")
                         + (", completion ignored (the student writes its own)" if "completion" in keys else ""))
    if "privileged_context" in keys and "prompt" in keys:
        return RowFormat("TRL", _trl, "prompt, privileged_context -> context")
    if not keys & {"prompt", "messages"} and keys & {"question", "problem"}:
        prompt = "question" if "question" in keys else "problem"
        answer = next((k for k in ("answer", "solution") if k in keys), None)
        return RowFormat("plain columns", lambda r: _plain(r, prompt, answer),
                         f"{prompt} -> prompt" + (f", {answer} -> answer" if answer else ""))
    return RowFormat(NATIVE, _same, "")


def _dropped(chat: Any) -> str:
    """What the description says of a chat ending with the assistant's turn."""
    return " without its last assistant turn" if _chat(chat) is not chat else ""


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _same(record: dict) -> dict:
    return record


def _own_keys(record: dict, drop: tuple[str, ...]) -> dict:
    """What the record says in opcd's own keys (``answer``, ``verifier``, ``data_source``), ``drop`` left out."""
    return {key: record[key] for key in ("answer", "verifier", "data_source") if key in record and key not in drop}


def _chat(messages: Any) -> Any:
    """A chat the student answers: a trailing assistant turn (a reference response) is not part of the prompt."""
    if _is_chat(messages) and len(messages) > 1 and messages[-1].get("role") == "assistant":
        return messages[:-1]
    return messages


def _trl(record: dict) -> dict:
    prompt = record.get("prompt")
    read = {"messages": _chat(prompt)} if isinstance(prompt, list) else {"prompt": prompt}
    if record.get("privileged_context") is not None:
        read["context"] = record["privileged_context"]
    return read | _own_keys(record, ())


def _ms_swift(record: dict) -> dict:
    read = {"messages": _chat(record.get("messages")), "context": record.get("teacher_prompt")}
    return read | _own_keys(record, ())


def _verl(record: dict, prompt_key: str) -> dict:
    read = {"messages": _chat(record.get(prompt_key))}
    reward = record.get("reward_model")
    truth = reward.get("ground_truth") if isinstance(reward, dict) else None
    if truth is not None:
        read["answer"] = truth if not isinstance(truth, list) or len(truth) != 1 else truth[0]
    return read | _own_keys(record, ("answer",) if truth is not None else ())


def _plain(record: dict, prompt: str, answer: str | None) -> dict:
    read = {"prompt": record.get(prompt)}
    if answer is not None and record.get(answer) is not None:
        read["answer"] = record[answer]
    if record.get("context") is not None:
        read["context"] = record["context"]
    return read | {key: record[key] for key in ("verifier", "data_source") if key in record}


# --- the user's own mapping: --prompt-field, --prompt-template, ... ---------------------------------------

def mapped(fields) -> RowFormat:
    """The rows as ``fields`` (a ``FieldOptions``) says: each setting given replaces what opcd's own keys say."""
    said = [f"{one_line(value)} -> {name.split('_')[0]}" for name, value in vars(fields).items()
            if value is not None and name not in ("split", "eval_split")]
    return RowFormat(MAPPED, lambda record: _mapped(record, fields), ", ".join(said))


def one_line(text: str) -> str:
    return text.replace("\n", "\\n")


def _mapped(record: dict, fields) -> dict:
    read = {key: record[key] for key in ("prompt", "messages", "context", "answer", "verifier", "data_source")
            if key in record}
    if fields.prompt_template is not None:
        read.pop("messages", None)
        read["prompt"] = fill(fields.prompt_template, record, "--prompt-template")
    elif fields.prompt_field is not None:
        read.pop("messages", None)
        read["prompt"] = dotted(record, fields.prompt_field, "--prompt-field")
    elif fields.messages_field is not None:
        read.pop("prompt", None)
        read["messages"] = _chat(dotted(record, fields.messages_field, "--messages-field"))
    if fields.context_field is not None:
        read["context"] = dotted(record, fields.context_field, "--context-field")
    if fields.answer_template is not None:
        read["answer"] = fill(fields.answer_template, record, "--answer-template")
    elif fields.answer_field is not None:
        read["answer"] = dotted(record, fields.answer_field, "--answer-field")
    return read


class RowError(OpcdError):
    """A mapping that does not fit a row: the caller adds which row."""


def dotted(record: dict, path: str, flag: str) -> Any:
    """The value at ``path`` (``reward_model.ground_truth``); a path that leads nowhere says where it stopped."""
    value: Any = record
    for depth, part in enumerate(path.split(".")):
        if not isinstance(value, dict) or part not in value:
            where = ".".join(path.split(".")[:depth]) or "the row"
            has = (f"its keys: {', '.join(map(str, value))}" if isinstance(value, dict)
                   else f"it is {type(value).__name__}")
            raise RowError(f"{flag} {path}: {where} has no {part!r} ({has})")
        value = value[part]
    return value


class _Columns(string.Formatter):
    """``str.format`` over a row's columns, with ``:letter`` (0 -> A) and ``:letter1`` (1 -> A)."""

    def format_field(self, value: Any, spec: str) -> str:
        if spec in ("letter", "letter1"):
            index = int(value) - (spec == "letter1")
            if not 0 <= index < 26:
                raise ValueError(f"{value!r} is not a choice number for :{spec}")
            return chr(ord("A") + index)
        return super().format_field(value, spec)


def fill(template: str, record: dict, flag: str) -> str:
    """``template`` with the row's columns put in; a column the row lacks names the row's columns."""
    try:
        return _Columns().vformat(template, (), record)
    except KeyError as e:
        raise RowError(f"{flag} names the column {e.args[0]!r}, which the row does not have (its columns: "
                       f"{', '.join(map(str, record))})") from None
    except (ValueError, IndexError, TypeError, AttributeError) as e:
        raise RowError(f"{flag} {template!r} cannot be filled from the row: {e}") from None

