"""The two views of an example: the teacher's, with the context, and the student's, without it.

Both are rendered by each model's own chat template, then tokenized with ``add_special_tokens=False`` (the
template already holds any BOS). Sampled response ids are appended to each view's prompt ids unchanged, so
the teacher scores exactly the tokens the student produced. ``check_alignment`` verifies, per example, that
this splice is what the templates themselves would render, identically in both views.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from .data import Example
from .errors import OpcdError

PROBE_RESPONSE = "OK"


@dataclass(frozen=True)
class Views:
    """Token ids of one example's prompt as the student sees it and as the teacher sees it."""

    student_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    student_context_ids: tuple[int, ...]  # the student's own template with the context (for the consistency term)


def with_context(messages: tuple[tuple[str, str], ...], context: str | None, context_as: str) -> list[dict]:
    """The chat as a list of message dicts, with ``context`` as a system message or in front of the first user turn."""
    chat = [{"role": role, "content": content} for role, content in messages]
    if not context:
        return chat
    if context_as == "system":
        if chat[0]["role"] == "system":
            chat[0] = {"role": "system", "content": f"{context}\n\n{chat[0]['content']}"}
        else:
            chat.insert(0, {"role": "system", "content": context})
        return chat
    first_user = next(i for i, m in enumerate(chat) if m["role"] == "user")
    chat[first_user] = {"role": "user", "content": f"{context}\n\n{chat[first_user]['content']}"}
    return chat


# Templates that stamp the date into the prompt (Llama-3.1 and 3.2 read ``date_string``, else today's date) get
# one date per process: both views, and every row, read the same line even when a run crosses midnight.
RUN_DATE = datetime.date.today().strftime("%d %b %Y")


class ChatRenderer:
    """Renders chats to token ids with one tokenizer's chat template."""

    def __init__(self, tokenizer, name: str, template_kwargs: dict | None = None):
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise OpcdError(f"the tokenizer of {name} has no chat template; use a chat model or set `chat_template` in its tokenizer_config.json")
        self.tokenizer, self.name, self.template_kwargs = tokenizer, name, dict(template_kwargs or {})
        if isinstance(template, str) and "date_string" in template:
            self.template_kwargs.setdefault("date_string", RUN_DATE)

    def _ids(self, chat: list[dict], generation_prompt: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=generation_prompt, **self.template_kwargs
            )
        except Exception as e:  # jinja raises its own errors, e.g. for a system role the template refuses
            hint = " (try --context-as user-prefix)" if any(m["role"] == "system" for m in chat) else ""
            raise OpcdError(f"the chat template of {self.name} failed: {e}{hint}") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[:2] == [bos, bos]:
            raise OpcdError(f"the chat template of {self.name} renders two BOS tokens; fix the template")
        return ids

    def prompt_ids(self, chat: list[dict]) -> list[int]:
        return self._ids(chat, generation_prompt=True)

    def prompt_and_continuation(self, chat: list[dict], response: str, where: str) -> tuple[list[int], list[int]]:
        """The prompt's ids, and what the template writes after them when ``response`` answers the prompt.

        Fails if the prompt is not a prefix of the answered chat: then sampled tokens would not continue what
        the template expects.
        """
        prompt = self.prompt_ids(chat)
        full = self._ids(chat + [{"role": "assistant", "content": response}], generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise OpcdError(
                f"the chat template of {self.name} renders the prompt of {where} differently once an answer "
                "follows it, so sampled tokens would not continue what the template expects; fix the template"
            )
        return prompt, full[len(prompt) :]


def build_views(
    examples: list[Example],
    context: str | None,
    context_as: str,
    student: ChatRenderer,
    teacher: ChatRenderer,
) -> list[Views]:
    """Each example's two prompt views (per-row contexts win over ``context``), checked for alignment with a
    probe answer: the row's ``answer``, else a fixed word."""
    return [aligned_views(example.messages, example.context or context, context_as, student, teacher,
                          example.answer or PROBE_RESPONSE, f"row {example.row}") for example in examples]


def aligned_views(messages: tuple[tuple[str, str], ...], context: str | None, context_as: str, student: ChatRenderer,
                  teacher: ChatRenderer, probe: str, where: str) -> Views:
    """A chat's two prompt views. The check renders ``probe`` as the answer after both prompts and fails, naming
    ``where`` (a row, a game's turn), if the template would write it as different tokens in the two views."""
    student_chat = with_context(messages, None, context_as)
    teacher_chat = with_context(messages, context, context_as)
    student_ids, student_tail = student.prompt_and_continuation(student_chat, probe, where)
    teacher_ids, teacher_tail = teacher.prompt_and_continuation(teacher_chat, probe, where)
    if student_tail != teacher_tail:
        raise OpcdError(f"{where}: the answer {probe!r} becomes different tokens after the teacher's prompt (with "
                        f"context) than after the student's: {first_difference(teacher_tail, teacher, student_tail, student)}; "
                        "the chat templates do not line up (check --chat-template-kwargs and --context-as)")
    student_context_ids = teacher_ids if teacher is student else student.prompt_ids(teacher_chat)
    return Views(tuple(student_ids), tuple(teacher_ids), tuple(student_context_ids))


def first_difference(teacher_ids: list[int], teacher: ChatRenderer, student_ids: list[int], student: ChatRenderer) -> str:
    """Where two renderings of an answer part: the first differing token of each, by position, text and id."""
    i = next((i for i, (a, b) in enumerate(zip(teacher_ids, student_ids)) if a != b), min(len(teacher_ids), len(student_ids)))

    def token(ids: list[int], renderer: ChatRenderer) -> str:
        return f"{renderer.tokenizer.decode([ids[i]])!r} ({ids[i]})" if i < len(ids) else "the end"

    return f"answer token {i} is {token(teacher_ids, teacher)} for the teacher, {token(student_ids, student)} for the student"
