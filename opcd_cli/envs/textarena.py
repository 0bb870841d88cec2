"""TextArena's single-player games (``--env textarena:ID``, ``pip install 'opcd[textarena]'``) through opcd's
environment interface: ``ta.make(ID, **env_options)`` is reset with the game's seed, its observations become
the text of each turn, the model's reply (after its thinking) is the move, and the game is won when TextArena
gives the player the full reward of 1 (its partial credit for a lost game, a share of the way to the goal,
counts as a loss, as the paper's success rate counts it).

The first turn reads TextArena's whole first observation (the rules and the board); each later turn reads what
the game said about the move (the move, the new board, a warning about an invalid move), never the reply
echoed back. The official settings use the ``-raw`` ids (no TextArena wrappers): ``FrozenLake-v0-raw`` with
``{"size": 3, "num_holes": 2, "randomize_start_goal": false}`` and ``Sokoban-v0-raw`` with
``{"dim_room": [6, 6], "num_boxes": 1}``, at most 5 moves. TextArena is imported only when a game names it.
FrozenLake and Sokoban need no downloads; its word games download nltk word lists when they are first made.
"""

from __future__ import annotations

import difflib
import importlib.util
import random
from contextlib import contextmanager
from typing import Any

from ..errors import OpcdError

PREFIX = "textarena:"
INSTALL = "pip install 'opcd[textarena]'"


def registry() -> dict:
    """TextArena's registered games by id; one line when TextArena is not installed."""
    if importlib.util.find_spec("textarena") is None:
        raise OpcdError(f"--env textarena:... needs TextArena: {INSTALL}")
    from textarena.envs.registration import ENV_REGISTRY

    return ENV_REGISTRY


def single_player(spec) -> bool:
    """Whether a registered game is for one player: its module keeps a ``SinglePlayerState`` (read from its
    source, so that no game module is imported, and no word list downloaded, to find out)."""
    try:
        found = importlib.util.find_spec(spec.entry_point.partition(":")[0])
        with open(found.origin, encoding="utf-8") as f:
            return "SinglePlayerState" in f.read()
    except (ImportError, OSError, AttributeError, ValueError):
        return False


def game_class(env_id: str):
    """The class a TextArena id makes, checked: a known id, a single-player game; each refusal one line."""
    games = registry()
    spec = games.get(env_id)
    if spec is None:
        close = [i for i in difflib.get_close_matches(env_id, list(games), n=12, cutoff=0.4)
                 if single_player(games[i])][:5]
        hint = f"; close single-player ids: {', '.join(close)}" if close else ""
        raise OpcdError(f"--env textarena:{env_id}: TextArena has no game {env_id!r}{hint}")
    if not single_player(spec):
        raise OpcdError(f"--env textarena:{env_id} is a game for several players; opcd plays single-player games "
                        "against the environment (such as FrozenLake-v0-raw or Sokoban-v0-raw)")
    module_name, _, class_name = spec.entry_point.partition(":")
    import importlib

    try:
        return getattr(importlib.import_module(module_name), class_name)
    except Exception as e:  # a game module that does not import on this Python (a syntax error, a missing package)
        raise OpcdError(f"--env textarena:{env_id}: cannot import {module_name} ({type(e).__name__}: {e})") from None


@contextmanager
def own_random_state():
    """TextArena seeds Python's ``random`` for its games; opcd's own draws are left as they were."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


def text_of(observation: Any, first: bool) -> str:
    """A TextArena observation (a list of (sender, message, kind), or a wrapper's string) as the turn's text:
    every message of the game's at the first turn; later, what the game said, not the player's echoed move."""
    if isinstance(observation, str):
        return observation.strip()
    from textarena import GAME_ID, ObservationType

    messages = [message for sender, message, kind in observation
                if first or (sender == GAME_ID and kind != ObservationType.PLAYER_ACTION)]
    return "\n\n".join(str(m).strip() for m in messages if str(m).strip())


class TextArenaGame:
    """One game of a TextArena single-player environment, in opcd's environment interface."""

    def __init__(self, env_id: str, **options: Any):
        self.env_id, self.options = env_id, {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        self.env = None

    def reset(self, seed: int) -> str:
        import textarena as ta

        with own_random_state():
            self.env = ta.make(self.env_id, **self.options)
            self.env.reset(num_players=1, seed=seed)
            _, observation = self.env.get_observation()
        return text_of(observation, first=True)

    def step(self, reply: str):
        move = reply.rsplit("</think>", 1)[-1]  # the answer after a reasoning model's thinking
        with own_random_state():
            done, _ = self.env.step(move)
            state = self.env.state
            invalid = state.error_count > 0 or bool(state.game_info.get(0, {}).get("invalid_move"))
            if done:
                rewards, game_info = self.env.close()
                won = (rewards or {}).get(0, 0) >= 1
                reason = (game_info or {}).get(0, {}).get("reason") or ""
                return f"{reason}".strip() or "The game is over.", 1.0 if won else 0.0, True, {"invalid": invalid}
            _, observation = self.env.get_observation()
        return text_of(observation, first=False), 0.0, False, {"invalid": invalid}


def factory_for(env_id: str, options: dict[str, Any]):
    """``(make, check)``: the game's constructor class (to check ``--env-options`` against) and a function
    that makes one game; raises ``OpcdError`` for an id that is not a single-player game."""
    cls = game_class(env_id)
    return cls, lambda: TextArenaGame(env_id, **options)
