"""The two views of an example: the teacher's, with the context, and the student's, without it.

Both are rendered by each model's own chat template, then tokenized with ``add_special_tokens=False`` (the
template already holds any BOS). Sampled response ids are appended to each view's prompt ids unchanged, so
the teacher scores exactly the tokens the student produced. ``check_alignment`` verifies, per example, that
this splice is what the templates themselves would render, identically in both views.

Text a user supplies never becomes a control token. The template's own markers (``<|im_start|>``,
``<|eot_id|>``...) are control tokens; the same strings written inside a system or user message (a row, a
context, an environment's observation, an experience item) are tokenized as the text they are
(``ControlTokens``), so data cannot forge a turn. Assistant turns are the model's own words and are rendered as
the template renders them.
"""

from __future__ import annotations

import datetime
import re
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


class ControlTokens:
    """A tokenizer's control tokens (its added tokens: ``<|im_start|>``, ``<think>``, ``<|eot_id|>``...), and the
    tokenization of text that holds their strings as plain text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = {text: i for text, i in tokenizer.get_added_vocab().items() if text}
        self.ids = frozenset(added.values())
        self.pattern = (re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
                        if added else None)

    def find(self, text: str) -> str | None:
        """The first control string in ``text``, or None."""
        match = self.pattern.search(text) if self.pattern is not None and text else None
        return match.group(0) if match else None

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def as_text(self, text: str) -> list[int]:
        """``text`` tokenized with every control string in it as text: its first character and the rest
        tokenized apart, so that no control token can match (``<|im_end|>`` reads ``<`` then ``|im_end|>``)."""
        ids, start = [], 0
        for match in (self.pattern.finditer(text) if self.pattern is not None else ()):
            ids += self._plain(text[start:match.start()])
            ids += self._plain(match.group(0)[0]) + self.as_text(match.group(0)[1:])
            start = match.end()
        return ids + self._plain(text[start:])

    def mark_text(self, text: str) -> str:
        """``text`` with each control string in it set between ‹ and › (how ``show`` writes them as text)."""
        return self.pattern.sub(lambda m: f"‹{m.group(0)}›", text) if self.pattern is not None else text

    def show(self, ids) -> str:
        """``ids`` decoded, each control string that is text here (not a control token) set between ‹ and ›."""
        pieces, run = [], []

        def flush():
            if run:
                pieces.append(self.mark_text(self.tokenizer.decode(run)))
                run.clear()

        for i in ids:
            if i in self.ids:
                flush()
                pieces.append(self.tokenizer.decode([i]))
            else:
                run.append(i)
        flush()
        return "".join(pieces)


PASSED_BY_TRANSFORMERS = {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token",
                          "pad_token", "unk_token", "raise_exception", "strftime_now"}  # what every render gets


def _template_trees(template) -> list:
    """The parsed chat template(s) (a tokenizer may hold several by name), as transformers' own environment parses
    them; empty when they cannot be parsed here (the render then speaks for itself)."""
    sources = list(template.values()) if isinstance(template, dict) else [template]
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return [_compile_jinja_template(source).environment.parse(source) for source in sources]
    except Exception:
        return []


def _truth_tested(expression) -> set[str]:
    """The variables whose truth ``expression`` tests (``x``, ``not x``, ``x and y``, ``x is false``)."""
    from jinja2 import nodes

    if isinstance(expression, nodes.Name):
        return {expression.name}
    if isinstance(expression, nodes.Not):
        return _truth_tested(expression.node)
    if isinstance(expression, (nodes.And, nodes.Or)):
        return _truth_tested(expression.left) | _truth_tested(expression.right)
    if isinstance(expression, nodes.Test) and expression.name in ("true", "false", "boolean", "sameas"):
        return _truth_tested(expression.node) if isinstance(expression.node, nodes.Name) else set()
    return set()


def check_template_kwargs(template, kwargs: dict, name: str) -> None:
    """``--chat-template-kwargs`` against what the template reads: every key a variable it uses, and a true or
    false (not a string such as ``"false"``, which Jinja counts as true) for every variable it tests as one."""
    if not kwargs:
        return
    trees = _template_trees(template)
    if not trees:
        return
    from jinja2 import meta, nodes

    read = set().union(*(meta.find_undeclared_variables(tree) for tree in trees))
    own = sorted(read - PASSED_BY_TRANSFORMERS - {node.name for tree in trees for node in tree.find_all(nodes.Name)
                                                   if node.ctx in ("store", "param")})  # not the template's own
    tested = set()
    for tree in trees:
        for node in tree.find_all((nodes.If, nodes.CondExpr, nodes.Test, nodes.Not, nodes.And, nodes.Or)):
            tested |= _truth_tested(node.test if isinstance(node, (nodes.If, nodes.CondExpr)) else node)
    for key, value in kwargs.items():
        if key not in read:
            raise OpcdError(f"--chat-template-kwargs: the chat template of {name} does not read {key!r} (it reads "
                            f"{', '.join(own) if own else 'no keyword arguments'}); check the spelling")
        if key in tested and not isinstance(value, bool):
            raise OpcdError(f"--chat-template-kwargs: {key} must be true or false, not {value!r}: the chat template of "
                            f"{name} tests it as a boolean (and any non-empty string counts as true)")


SENTINEL = "QQ{}OPCDMESSAGEQQ"  # stands in for a message's text, to find where the template puts it


class ChatRenderer:
    """Renders chats to token ids with one tokenizer's chat template."""

    def __init__(self, tokenizer, name: str, template_kwargs: dict | None = None):
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise OpcdError(f"the tokenizer of {name} has no chat template; use a chat model or set `chat_template` in its tokenizer_config.json")
        self.tokenizer, self.name, self.template_kwargs = tokenizer, name, dict(template_kwargs or {})
        check_template_kwargs(template, self.template_kwargs, name)
        if isinstance(template, str) and "date_string" in template:
            self.template_kwargs.setdefault("date_string", RUN_DATE)
        self.controls = ControlTokens(tokenizer)

    def _text(self, chat: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=generation_prompt, **self.template_kwargs
            )
        except Exception as e:  # jinja raises its own errors, e.g. for a system role the template refuses
            hint = " (try --context-as user-prefix)" if any(m["role"] == "system" for m in chat) else ""
            raise OpcdError(f"the chat template of {self.name} failed: {e}{hint}") from None

    def _ids(self, chat: list[dict], generation_prompt: bool) -> list[int]:
        text = self._text(chat, generation_prompt)
        holding = [i for i, m in enumerate(chat) if m["role"] != "assistant" and self.controls.find(m["content"])]
        if holding:  # some message's own text holds a control string: tokenize that text as text
            ids = self._ids_as_text(chat, generation_prompt, text, holding)
        else:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[:2] == [bos, bos]:
            raise OpcdError(f"the chat template of {self.name} renders two BOS tokens; fix the template")
        return ids

    def _ids_as_text(self, chat: list[dict], generation_prompt: bool, text: str, holding: list[int]) -> list[int]:
        """The chat's ids with the text of the messages ``holding`` control strings tokenized as text. Where the
        template puts each message is found by rendering it with stand-ins for those messages; the template's
        own parts keep their control tokens."""
        stand_ins = [dict(m) for m in chat]
        for n, i in enumerate(holding):
            stand_ins[i]["content"] = SENTINEL.format(n)
        skeleton = self._text(stand_ins, generation_prompt)
        parts = re.split("QQ([0-9]+)OPCDMESSAGEQQ", skeleton)  # template text, message number, template text, ...
        ids, position = [], 0
        for k in range(0, len(parts), 2):
            template_part = parts[k]
            if not text.startswith(template_part, position):
                break
            ids += self.tokenizer(template_part, add_special_tokens=False)["input_ids"] if template_part else []
            position += len(template_part)
            if k + 1 == len(parts):
                return ids
            content, following = chat[holding[int(parts[k + 1])]]["content"], parts[k + 2]
            shown = next((c for c in (content, content.strip(), content.rstrip(), content.lstrip())
                          if text.startswith(c, position) and text.startswith(following, position + len(c))), None)
            if shown is None:
                break
            ids += self.controls.as_text(shown)
            position += len(shown)
        control = self.controls.find(chat[holding[0]]["content"])
        raise OpcdError(f"a message holds {control!r}, the string of a control token of {self.name}, and its chat "
                        "template changes that message's text, so it cannot be kept as plain text; remove the "
                        "string from the data")

    def show(self, ids) -> str:
        """Ids as text for people: control strings that are text (not control tokens) set between ‹ and ›."""
        return self.controls.show(ids)

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
