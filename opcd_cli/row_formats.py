"""What a row's columns mean: the formats of the tools people come from, recognised by their columns, each
read into opcd's own row (``prompt`` or ``messages``, optional ``context``, ``answer`` and ``verifier``).

| format | recognised by | read as |
| --- | --- | --- |
| opcd's own, TRL standard | ``prompt`` (a string) or ``messages`` | as it is; TRL's ``privileged_context`` is the row's context |
| TRL conversational | ``prompt`` holding a list of messages | the messages (a trailing assistant turn dropped); ``privileged_context`` the context |
| ms-swift | ``messages`` with ``teacher_prompt`` | the messages (a trailing assistant turn dropped); ``teacher_prompt`` the context |
| verl, the official OPCD code | ``reward_model`` or ``data_source`` beside ``prompt``/``content`` messages | the messages; ``reward_model.ground_truth`` (else ``answer``) the answer |
| plain columns | ``question`` or ``problem``, no ``prompt`` or ``messages`` | the prompt; ``answer`` or ``solution`` the answer |

A file's format is recognised from its first row and said once, in one line; every row is then read the
same way (a row that does not fit names itself, as opcd's own rows do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

NATIVE = "opcd's own"


@dataclass(frozen=True)
class RowFormat:
    """A recognised format: its name, how a record of it becomes opcd's own, and what it maps, in words."""

    name: str
    read: Callable[[dict], dict]
    mapping: str  # e.g. "prompt (messages), privileged_context -> context"

    def describe(self, what: str, path: str) -> str:
        return f"{what} {path}: rows read as {self.name}: {self.mapping}"


def recognise(record: Any) -> RowFormat:
    """The format of a file whose first row is ``record`` (opcd's own when nothing else fits)."""
    if not isinstance(record, dict):
        return RowFormat(NATIVE, _same, "")
    keys = set(record)
    if "teacher_prompt" in keys and "messages" in keys:
        return RowFormat("ms-swift", _ms_swift, "messages" + _dropped(record["messages"]) + ", teacher_prompt -> context")
    prompt_key = next((k for k in ("prompt", "content") if _is_chat(record.get(k))), None)
    if prompt_key is not None and keys & {"reward_model", "data_source"}:
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
    """What the record says in opcd's own keys (``answer``, ``verifier``), ``drop`` left out."""
    return {key: record[key] for key in ("answer", "verifier") if key in record and key not in drop}


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
    return read | ({"verifier": record["verifier"]} if "verifier" in record else {})
