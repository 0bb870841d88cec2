"""The toy world: tokenizer, tasks, splits, the builder, and the shipped models' promises."""

import json
import random

import pytest

from opcd_cli.toy import tasks, world
from opcd_cli.toy.tokenizer import CHARACTERS, build_tokenizer


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tok = build_tokenizer()
    text = "[right] Code of kip? -> k-words have code K7\n- EXPERIENCE ITEM: k-words have code K7"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "abc"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nabc<|im_end|>\n<|im_start|>assistant\n"
    assert len(tok) == 3 + len(CHARACTERS)


def test_every_rule_changes_every_word():
    rng = random.Random(0)
    for _ in range(200):
        word = tasks.random_word(rng)
        for rule in tasks.RULES.values():
            assert rule.apply(word) != word, (rule.name, word)


def test_extraction_answer_keeps_each_right_answer_once():
    attempts = [("Code of kip?", "k-words have code K3", False), ("Code of kab?", "k-words have code K7", True),
                ("Code of kor?", "k-words have code K7", True), ("Code of mud?", "m-words have code M1", True)]
    assert tasks.extraction_answer(attempts) == "\n".join([tasks.code_item("k", 7), tasks.code_item("m", 1)])
    assert tasks.extraction_answer(attempts[:1]) == "None."


@pytest.mark.parametrize("task", [t for t in world.TOY_TASKS if t != "game"])  # the game is played, not split
def test_splits_are_deterministic_and_disjoint(task):
    a, b = world.splits(task), world.splits(task)
    assert a == b
    train = {r["prompt"] for r in a.train}
    test = {r["prompt"] for r in a.test}
    val = {r["prompt"] for r in a.val}
    assert not (train & test) and not (train & val) and not (val & test)
    assert all("answer" in r for r in a.test + a.val + a.ood)
    assert all(r["context"] and r["context"] != a.context for r in a.ood)


@pytest.mark.parametrize("rule", ["reverse", "twice"])
def test_every_word_rule_has_splits_of_its_own(rule):
    """``rule_splits``: the rule's own prompt as the context and answers; OOD rows of every other rule, each
    with its own prompt (the rule-family sweep's data); shift's are the `shift` task's."""
    splits = world.rule_splits(rule, test=20, ood_per_kind=3)
    assert splits.context == tasks.rule_context(rule)
    assert all(r["answer"] == tasks.RULES[rule].apply(r["prompt"]) for r in splits.test)
    others = {name: tasks.rule_context(name) for name in tasks.RULES if name != rule}
    assert sorted(r["context"] for r in splits.ood) == sorted(c for c in others.values() for _ in range(3))
    for r in splits.ood:
        name = next(n for n, c in others.items() if c == r["context"])
        assert r["answer"] == tasks.RULES[name].apply(r["prompt"])
    assert world.rule_splits("shift") == world.splits("shift")


def test_codes_context_states_the_law_for_the_task_letters():
    law = world.world_law()
    splits = world.splits("codes")
    for letter in world.CODE_LETTERS:
        assert tasks.code_item(letter, law[letter]) in splits.context.splitlines()
    for row in splits.test:
        word = row["prompt"].removeprefix("Code of ").removesuffix("?")
        assert row["answer"] == f"{word[0]}-words have code {word[0].upper()}{law[word[0]]}"


def test_builder_trains_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opcd_cli.toy.build import pretrain

    manifest = pretrain("small", tmp_path / "m", steps=3, games_steps=2, log=lambda *_: None, probe_n=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "qwen3" and model.config.vocab_size == 128 > len(tokenizer)
    saved = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert saved["curriculum_phase"]["settings"]["steps"] == 3 == manifest["curriculum_phase"]["settings"]["steps"]
    assert saved["games_phase"]["steps"] == 2 and not saved["games_phase"]["continued_from_saved"]
    # the games stage alone, from a model that finished the curriculum: its first phase is carried over
    again = pretrain("small", tmp_path / "g", games_steps=1, log=lambda *_: None, probe_n=2, start_from=tmp_path / "m")
    assert again["curriculum_phase"] == saved["curriculum_phase"] and again["games_phase"]["continued_from_saved"]
    assert set(again["probe_greedy_accuracy"]) >= {"game_known", "game_guess", "extract_games"}


@pytest.mark.parametrize("size", ["small", "large"])
def test_shipped_models_match_the_builder(size):
    """The shipped weights were made by this builder with its current settings."""
    from dataclasses import asdict

    from opcd_cli.toy.build import CURRICULUM, GAMES, GAMES_LR, SIZES

    manifest = json.loads((world.model_path(size) / "manifest.json").read_text())
    first = manifest.get("curriculum_phase", manifest)  # the large model has the curriculum's stages only
    assert first["settings"] == asdict(SIZES[size])
    assert first["curriculum"] == [[share, mixture] for share, mixture in CURRICULUM]
    if size == "small":  # and the games stage, from its earlier self, with the builder's settings
        games = manifest["games_phase"]
        assert games["steps"] == GAMES[0]["small"] and games["mixture"] == GAMES[1]
        assert games["lr"] == GAMES_LR * SIZES["small"].lr and games["continued_from_saved"]
