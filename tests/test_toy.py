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


def test_recall_context_is_the_code_law_as_a_table():
    """`recall`: the table holds the code law's digit for each key; each answer gives every asked key (three to
    five distinct ones) with its code, in the order asked; OOD rows ask other keys of their own tables."""
    law, splits = world.world_law(), world.splits("recall")
    assert splits.context == "Codes: " + " ".join(f"{key}{law[key.lower()]}" for key in world.RECALL_KEYS)
    table = dict((step[0], int(step[1])) for step in splits.context.removeprefix("Codes: ").split())
    for row in splits.val + splits.test:
        asked = row["prompt"].removeprefix("Recall: ").split()
        assert 3 <= len(asked) <= 5 and len(set(asked)) == len(asked) and set(asked) <= set(world.RECALL_KEYS)
        assert row["answer"] == " ".join(f"{key}{table[key]}" for key in asked)
    lengths = {len(r["prompt"].split()) - 1 for r in splits.train}
    assert lengths == {3, 4, 5}
    for row in splits.ood:
        other = dict((step[0], int(step[1])) for step in row["context"].removeprefix("Codes: ").split())
        asked = row["prompt"].removeprefix("Recall: ").split()
        assert not set(other) & set(world.RECALL_KEYS) and set(asked) <= set(other)
        assert row["answer"] == " ".join(f"{key}{other[key]}" for key in asked)
    # the task asks in the format of the recall drills the toy models were pretrained on, the table moved to the
    # system prompt
    assert tasks.recall_prompt(table, ["K", "D"]) == splits.context + "\nRecall: K D"


def test_shipped_student_recalls_from_the_table_only_when_it_is_there():
    """The promise the `recall` task rests on: pretraining taught looking codes up in a table (the drills), so
    with the table as the system prompt the shipped student answers, and without it it cannot."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = world.model_path("small")
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    splits = world.splits("recall")
    rows = splits.test[:24]
    for context, low, high in ((splits.context, 0.9, 1.0), (None, 0.0, 0.1)):
        right = 0
        for row in rows:
            system = [{"role": "system", "content": context}] if context else []
            ids = tokenizer.apply_chat_template(system + [{"role": "user", "content": row["prompt"]}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
            right += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == row["answer"]
        assert low <= right / len(rows) <= high, (context, right)


def test_recall_bench_scores_slips_step_by_step():
    """bench/recall_runs.py's step-by-step scores, on answers written by hand."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("recall_runs", Path(__file__).parents[1] / "bench" / "recall_runs.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"prompt": "Recall: K D M", "answer": "K9 D8 M6"}, {"prompt": "Recall: B P R T", "answer": "B1 P8 R9 T3"}]
    scored = bench.slips(["K9 D8 M6", "B1 R9 T3"], rows)  # the second skips P: every later step is out of step
    assert scored["exact"] == 0.5 and scored["out_of_step"] == 0.5
    assert scored["step_accuracy_by_position"] == [1.0, 0.5, 0.5, 0.0, None]  # steps 1 to 5; no row has a 5th
    # steps 2 and 3 of the first and step 2 of the second follow no slip (two of the three right: the second
    # wrote R9 for P8); steps 3 and 4 of the second follow that slip
    assert scored["step_accuracy_after_none"] == 2 / 3 and scored["steps_after_none"] == 3
    assert scored["step_accuracy_after_a_slip"] == 0.0 and scored["steps_after_a_slip"] == 2


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
