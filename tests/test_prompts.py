import pytest

from opcd_cli.data import Example
from opcd_cli.errors import OpcdError
from opcd_cli.prompts import ChatRenderer, build_views, with_context
from opcd_cli.toy.tokenizer import build_tokenizer

EXAMPLE = Example(row=3, messages=(("user", "abcd"),), answer="dcba")


@pytest.fixture
def renderer():
    return ChatRenderer(build_tokenizer(), "toy")


def test_views_share_the_user_turn_and_differ_by_the_context(renderer):
    (views,) = build_views([EXAMPLE], "Reply backwards.", "system", renderer, renderer)
    tok = renderer.tokenizer
    student, teacher = tok.decode(views.student_ids), tok.decode(views.teacher_ids)
    assert "Reply backwards." in teacher and "Reply backwards." not in student
    assert teacher.endswith(student[len("") :].split("<|im_start|>user")[-1])
    assert student.endswith("<|im_start|>assistant\n") and teacher.endswith("<|im_start|>assistant\n")


def test_row_context_wins_over_the_shared_one(renderer):
    row = Example(row=1, messages=(("user", "abcd"),), context="Row rule.")
    (views,) = build_views([row], "Shared rule.", "system", renderer, renderer)
    text = renderer.tokenizer.decode(views.teacher_ids)
    assert "Row rule." in text and "Shared rule." not in text


def test_context_placement():
    messages = (("system", "Be brief."), ("user", "abcd"))
    assert with_context(messages, "C", "system")[0] == {"role": "system", "content": "C\n\nBe brief."}
    assert with_context((("user", "abcd"),), "C", "user-prefix") == [{"role": "user", "content": "C\n\nabcd"}]
    assert with_context((("user", "abcd"),), None, "system") == [{"role": "user", "content": "abcd"}]


def test_template_that_writes_answers_differently_with_a_system_prompt_is_refused():
    tok = build_tokenizer()
    # A template that tags answers when a system message is present: the answer's tokens differ between views.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and messages[0]['role'] == 'system' %}A: {% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    broken = ChatRenderer(tok, "broken")
    with pytest.raises(OpcdError, match="row 3: the answer 'dcba' becomes different tokens"):
        build_views([EXAMPLE], "Reply backwards.", "system", broken, broken)


def test_template_whose_prompt_is_not_a_prefix_is_refused():
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant:\n{% endif %}"
    )
    with pytest.raises(OpcdError, match="row 3 differently once an answer follows"):
        build_views([EXAMPLE], None, "system", ChatRenderer(tok, "odd"), ChatRenderer(tok, "odd"))


def test_double_bos_is_refused():
    tok = build_tokenizer()
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = "<|endoftext|><|endoftext|>{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(OpcdError, match="two BOS"):
        ChatRenderer(tok, "bos").prompt_ids([{"role": "user", "content": "a"}])


def test_missing_template_is_a_clear_error():
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(OpcdError, match="no chat template"):
        ChatRenderer(tok, "base-model")


def test_template_refusing_a_system_role_suggests_user_prefix():
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    renderer = ChatRenderer(tok, "gemma-like")
    with pytest.raises(OpcdError, match="user-prefix"):
        build_views([EXAMPLE], "Reply backwards.", "system", renderer, renderer)
    (views,) = build_views([EXAMPLE], "Reply backwards.", "user-prefix", renderer, renderer)
    assert "Reply backwards.\n\nabcd" in tok.decode(views.teacher_ids)
