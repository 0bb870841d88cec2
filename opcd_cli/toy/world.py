"""The toy world's models, contexts and data splits (served by name through ``sources.py``; the settings of its
runs are the built-in recipes in ``toy/recipes/``).

Tasks:

* ``codes`` (experience style, the default): the context lists experience items stating the world's code
  law for eight starting letters; without it the student guesses the digit of its answer
  (``k-words have code K7``). OOD split: code questions about other letters, with items of another law in
  context.
* ``shift`` (system-prompt style): the context is a system prompt asking for every letter of the word to be
  replaced by the next letter of the alphabet; the student copies words without it. OOD split: the other
  word rules, each row with its own system prompt. On this task distillation also changes how the toy
  student follows the other rules (see ``bench/RESULTS.md``).
* ``recall`` (system-prompt style, several dependent steps): the context is a table of the world's codes by
  capital letter (``Codes: B1 D8 G1 ...``, the code law's digits for the ``codes`` task's letters); the user
  asks for three to five of them in some order (``Recall: K D M``) and the answer gives each key with its code
  in that order (``K9 D8 M6``). Without the table the student guesses each digit. Every step of the answer
  reads the ones before it: which key comes next is found by what has been written so far, so a skipped or
  repeated key puts the rest out of step (``bench/recall_runs.py`` measures how slips follow slips). OOD
  split: tables of other keys with other digits, each row with its own table.
* ``game`` (experience style, multi-turn): the doors game (``envs/doors.py``) on the world's code law, played
  turn by turn; the context is the ``codes`` task's items. No rows: ``opcd distill --toy-task game`` plays new
  games every step. OOD: games on four other letters under another law, with its items in context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import OpcdError
from . import tasks

ASSETS = Path(__file__).parent / "assets"
TOY_TASKS = ("shift", "codes", "recall", "game")
WORLD_SEED = 2026
CODE_LETTERS = "bdgkmprt"  # the letters whose codes the `codes` task distils
EXTRACT_TRAIN = 48  # training problems `opcd extract` attempts in the toy world
RECALL_KEYS = CODE_LETTERS.upper()  # the `recall` task's table: these keys, with the code law's digits
GAME_OOD = {"letters": "cfhl", "law_seed": 7}  # the doors game's options out of distribution

def model_path(size: str = "small") -> Path:
    if size not in ("small", "large"):
        raise OpcdError(f"unknown toy model toy:{size}; use toy:small or toy:large")
    path = ASSETS / size
    if not (path / "config.json").is_file():
        raise OpcdError(f"the toy model {size!r} is missing from {ASSETS}; rebuild it with `python -m opcd_cli.toy.build --size {size} --out {path}`")
    return path


@dataclass(frozen=True)
class ToySplits:
    context: str
    train: list[dict]
    val: list[dict]
    test: list[dict]
    ood: list[dict]


def splits(task: str, seed: int = WORLD_SEED, train: int = 512, val: int = 100, test: int = 200, ood_per_kind: int = 20) -> ToySplits:
    """The task's data, deterministic in ``seed``; words never repeat across train, val and test."""
    if task not in TOY_TASKS:
        raise OpcdError(f"unknown toy task {task!r}; choose one of {', '.join(TOY_TASKS)}")
    if task == "game":
        raise OpcdError("the toy game has no rows: it is played with --env doors (its texts are toy:game/context "
                        "and toy:game/ood-context)")
    rng = random.Random(seed)
    if task == "shift":
        return _rule_splits("shift", rng, train, val, test, ood_per_kind)
    if task == "recall":
        return _recall_splits(rng, train, val, test, ood_per_kind)
    return _codes_splits(rng, train, val, test, ood_per_kind)


def rule_splits(rule: str, seed: int = WORLD_SEED, train: int = 512, val: int = 100, test: int = 200,
                ood_per_kind: int = 20) -> ToySplits:
    """Any word rule's data (``tasks.RULES``), as ``splits("shift")`` gives shift's: its system prompt as the
    context, and OOD rows of every other rule, each with its own system prompt."""
    if rule not in tasks.RULES:
        raise OpcdError(f"unknown toy word rule {rule!r}; choose one of {', '.join(tasks.RULES)}")
    return _rule_splits(rule, random.Random(seed), train, val, test, ood_per_kind)


def _unique_words(rng: random.Random, count: int, make) -> list[str]:
    words: dict[str, None] = {}
    while len(words) < count:
        words.setdefault(make(rng))
    return list(words)


def _rule_splits(name: str, rng, n_train, n_val, n_test, ood_per_kind) -> ToySplits:
    rule = tasks.RULES[name]
    words = _unique_words(rng, n_train + n_val + n_test, tasks.random_word)
    train, val, test = words[:n_train], words[n_train : n_train + n_val], words[n_train + n_val :]
    ood = [
        {"prompt": w, "context": tasks.rule_context(other_name), "answer": other.apply(w)}
        for other_name, other in tasks.RULES.items()
        if other_name != name
        for w in (tasks.random_word(rng) for _ in range(ood_per_kind))
    ]
    return ToySplits(
        context=tasks.rule_context(name),
        train=[{"prompt": w, "answer": rule.apply(w)} for w in train],  # answers: for --reward-weight only
        val=[{"prompt": w, "answer": rule.apply(w)} for w in val],
        test=[{"prompt": w, "answer": rule.apply(w)} for w in test],
        ood=ood,
    )


def world_law(seed: int = WORLD_SEED) -> dict[str, int]:
    """The hidden code law of the toy world (never shown to the models in pretraining)."""
    return tasks.make_law(random.Random(seed))


def _codes_splits(rng, n_train, n_val, n_test, ood_per_kind) -> ToySplits:
    law = world_law()
    words = _unique_words(rng, n_train + n_val + n_test, lambda r: tasks.word_starting_with(r, r.choice(CODE_LETTERS)))

    def row(word: str) -> dict:
        return {"prompt": tasks.code_question(word), "answer": tasks.code_answer(word, law)}

    other_letters = [c for c in tasks.CONSONANTS if c not in CODE_LETTERS]
    ood = []
    for _ in range(ood_per_kind * 4):
        letters = rng.sample(other_letters, 4)
        other_law = {c: rng.randrange(10) for c in letters}
        word = tasks.word_starting_with(rng, rng.choice(letters))
        ood.append({"prompt": tasks.code_question(word), "context": tasks.code_context(other_law, letters),
                    "answer": tasks.code_answer(word, other_law)})
    return ToySplits(
        context=tasks.code_context(law, list(CODE_LETTERS)),
        train=[row(w) for w in words[:n_train]],
        val=[row(w) for w in words[n_train : n_train + n_val]],
        test=[row(w) for w in words[n_train + n_val :]],
        ood=ood,
    )


def recall_codes() -> dict[str, int]:
    """The ``recall`` task's table: each of ``RECALL_KEYS`` with the code law's digit for its letter."""
    law = world_law()
    return {key: law[key.lower()] for key in RECALL_KEYS}


def _recall_question(rng: random.Random, keys: str) -> tuple[str, ...]:
    return tuple(rng.sample(keys, rng.randint(3, 5)))


def _recall_splits(rng, n_train, n_val, n_test, ood_per_kind) -> ToySplits:
    codes = recall_codes()
    questions: dict[tuple[str, ...], None] = {}
    while len(questions) < n_train + n_val + n_test:
        questions.setdefault(_recall_question(rng, RECALL_KEYS))
    asked = list(questions)

    def row(keys) -> dict:
        return {"prompt": tasks.recall_question(keys), "answer": tasks.recall_answer(codes, keys)}

    other_keys = [c for c in tasks.CAPITALS if c not in RECALL_KEYS]
    ood = []
    for _ in range(ood_per_kind * 4):
        other = {key: rng.randrange(10) for key in rng.sample(other_keys, len(RECALL_KEYS))}
        keys = _recall_question(rng, "".join(other))
        ood.append({"prompt": tasks.recall_question(keys), "context": tasks.recall_table(other),
                    "answer": tasks.recall_answer(other, keys)})
    return ToySplits(
        context=tasks.recall_table(codes),
        train=[row(keys) for keys in asked[:n_train]],  # answers: for --reward-weight only
        val=[row(keys) for keys in asked[n_train : n_train + n_val]],
        test=[row(keys) for keys in asked[n_train + n_val :]],
        ood=ood,
    )


def game_context(ood: bool = False) -> str:
    """The doors game's context: the ``codes`` task's items, or (``ood``) the items of the other law for the
    letters of the games out of distribution."""
    if not ood:
        return tasks.code_context(world_law(), list(CODE_LETTERS))
    return tasks.code_context(world_law(GAME_OOD["law_seed"]), list(GAME_OOD["letters"]))
