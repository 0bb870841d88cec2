"""The toy world's game: a corridor of locked doors that open to the world's hidden code law.

Each door is marked with a word; its code is the word's capital first letter and the law's digit for that
letter (``k-words have code K7``, the answer to ``Code of kip?``). The player opens the doors one per turn and
wins by opening them all; a wrong code springs a trap and ends the game; a reply with no code in it (a capital
letter and a digit) is an invalid move and the same door is asked again. The experience items of the toy's
``codes`` task state the law, so with them in context the toy models walk through, and without them they
guess (one digit in ten).

Options (``--env-options``): ``doors`` (default 3), ``letters`` (the starting letters of the door words:
default the eight of the toy's ``codes`` task), ``law_seed`` (the law: default the world's own; another seed
makes another law, for games out of distribution).
"""

from __future__ import annotations

import random
import re

from ..toy import tasks, world

CODE = re.compile(r"\b([A-Z])(\d)\b")


def read_code(reply: str) -> tuple[str, int] | None:
    """The last code in the reply (``K7`` -> ``("k", 7)``), or None."""
    codes = CODE.findall(reply)
    return (codes[-1][0].lower(), int(codes[-1][1])) if codes else None


class Doors:
    """One game of doors, in text."""

    def __init__(self, doors: int = 3, letters: str = world.CODE_LETTERS, law_seed: int = world.WORLD_SEED):
        if isinstance(doors, bool) or not isinstance(doors, int) or doors < 1:
            raise ValueError(f"doors must be a whole number of at least 1; got {doors!r}")
        if not isinstance(letters, str) or not letters or not set(letters) <= set(tasks.CONSONANTS):
            raise ValueError(f"letters must be lowercase consonants; got {letters!r}")
        self.doors, self.letters, self.law = doors, letters, world.world_law(law_seed)
        self.words: list[str] = []
        self.opened = 0

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        self.words = [tasks.word_starting_with(rng, rng.choice(self.letters)) for _ in range(self.doors)]
        self.opened = 0
        return tasks.doors_first(self.doors, self.words[0])

    def step(self, reply: str):
        word = self.words[self.opened]
        code = read_code(reply)
        if code is None:
            return tasks.doors_again(word), 0.0, False, {"invalid": True}
        if code != (word[0], self.law[word[0]]):
            return tasks.DOORS_TRAP, 0.0, True, {"invalid": False}
        self.opened += 1
        if self.opened == self.doors:
            return tasks.DOORS_OUT, 1.0, True, {"invalid": False}
        return tasks.doors_next(self.words[self.opened]), 0.0, False, {"invalid": False}
