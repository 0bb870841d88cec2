"""FrozenLake as text: gymnasium's ``toy_text`` FrozenLake, its map drawn in letters, the move read from the
model's reply.

The move is the last of the words Left, Down, Right, Up (any case, a whole word) in the reply, after its
thinking when it has a ``</think>``. A reply without one is an invalid move: the player stays where it is and
the turn counts. Options (``--env-options``): ``size`` (the side of the square map, default 4), ``slippery``
(gymnasium's slippery ice: a move may go sideways; default false), ``random_map`` (each seed its own map, made
by gymnasium's ``generate_random_map``; default true: otherwise gymnasium's fixed 4x4 or 8x8 map).
"""

from __future__ import annotations

import importlib.util
import re

from ..errors import OpcdError

MOVES = ("left", "down", "right", "up")  # gymnasium's action numbers, in order
MOVE_WORD = re.compile(rf"\b({'|'.join(MOVES)})\b", re.IGNORECASE)
RULES = ("You are on a frozen lake, at P. Reach the goal G without stepping into a hole H; F is safe ice.{slip} "
         "Reply with one move: Left, Down, Right or Up.")


def read_move(reply: str) -> int | None:
    """The action number of the reply's move, or None."""
    answer = reply.rsplit("</think>", 1)[-1]
    words = MOVE_WORD.findall(answer)
    return MOVES.index(words[-1].lower()) if words else None


class FrozenLake:
    """One game of FrozenLake, in text."""

    def __init__(self, size: int = 4, slippery: bool = False, random_map: bool = True):
        if importlib.util.find_spec("gymnasium") is None:
            raise OpcdError("the frozenlake environment needs gymnasium: pip install 'opcd[games]'")
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"size must be a whole number of at least 2; got {size!r}")
        if not random_map and size not in (4, 8):
            raise ValueError(f"gymnasium's fixed maps are 4x4 and 8x8; got size {size} (or set random_map true)")
        self.size, self.slippery, self.random_map = size, bool(slippery), bool(random_map)
        self.env = None

    def reset(self, seed: int) -> str:
        import gymnasium
        from gymnasium.envs.toy_text.frozen_lake import generate_random_map

        kwargs = {"desc": generate_random_map(size=self.size, seed=seed)} if self.random_map else {
            "map_name": f"{self.size}x{self.size}"}
        self.env = gymnasium.make("FrozenLake-v1", is_slippery=self.slippery, **kwargs)
        self.position, _ = self.env.reset(seed=seed)
        slip = " The ice is slippery: a move may take you sideways." if self.slippery else ""
        return f"{RULES.format(slip=slip)}\n\n{self.board()}"

    def board(self) -> str:
        desc = self.env.unwrapped.desc
        rows = []
        for r, row in enumerate(desc):
            cells = [c.decode().replace("S", "F") for c in row]  # the start is safe ice like any other
            if self.position // len(row) == r:
                cells[self.position % len(row)] = "P"
            rows.append(" ".join(cells))
        return "\n".join(rows)

    def step(self, reply: str):
        action = read_move(reply)
        if action is None:
            return (f"No move found: reply with Left, Down, Right or Up.\n\n{self.board()}", 0.0, False,
                    {"invalid": True})
        self.position, reward, terminated, truncated, _ = self.env.step(action)
        cell = self.env.unwrapped.desc.flat[self.position].decode()
        outcome = {"H": "You fell into a hole.", "G": "You reached the goal."}.get(cell, "")
        text = f"You chose {MOVES[action].capitalize()}. {outcome}".strip()
        return f"{text}\n\n{self.board()}", float(reward), bool(terminated or truncated), {"invalid": False}
