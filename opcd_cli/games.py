"""Playing an environment turn by turn, and scoring the games.

Each game is a chat: the environment's observations are the user turns and the model's replies the assistant
turns, rendered by the model's chat template (with the context, when given, as a system message or in front of
the first observation). All games still going are advanced one turn at a time, their prompts generated in one
batch. A game ends when the environment says it is done, after ``max_turns`` replies, or when its next prompt
and a reply could not fit the model's window (a loss).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import envs
from .config import SamplingOptions
from .prompts import ChatRenderer, with_context
from .sampling import Sampler


@dataclass
class Game:
    """One game: its seed, the chat so far, and how it went."""

    seed: int
    messages: list[tuple[str, str]] = field(default_factory=list)  # (role, text): observations and replies
    reward: float = 0.0
    turns: int = 0
    invalid: int = 0  # replies without a move the environment could read
    done: bool = False
    out_of_window: bool = False

    @property
    def won(self) -> bool:
        return self.reward > 0


@dataclass(frozen=True)
class GameScores:
    """Success rate, mean turns and invalid-move rate over a set of games."""

    games: int
    success: float
    mean_turns: float
    invalid_rate: float  # of all replies
    mean_reward: float

    @staticmethod
    def of(games: Sequence[Game]) -> "GameScores":
        replies = sum(g.turns for g in games)
        return GameScores(len(games), sum(g.won for g in games) / len(games), replies / len(games),
                          sum(g.invalid for g in games) / replies if replies else 0.0,
                          sum(g.reward for g in games) / len(games))


def play(sampler: Sampler, renderer: ChatRenderer, make_env: Callable[[], envs.Environment], env_name: str,
         seeds: Sequence[int], *, context: str | None, context_as: str, sampling: SamplingOptions, max_turns: int,
         window: int | None = None, advance: Callable[[int], None] | None = None) -> list[Game]:
    """Play one game per seed; ``advance(k)`` is called as replies are made, and at the end with the turns
    the games did not need (``len(seeds) * max_turns`` in all)."""
    tokenizer = renderer.tokenizer
    games, running = [Game(seed) for seed in seeds], []
    for game in games:
        env = make_env()
        game.messages.append(("user", envs.reset(env, game.seed, env_name)))
        running.append((game, env))
    one_reply = dataclasses.replace(sampling, n=1)
    for _ in range(max_turns):
        prompts, playing = [], []
        for game, env in running:
            ids = renderer.prompt_ids(with_context(tuple(game.messages), context, context_as))
            if window is not None and len(ids) + sampling.max_new_tokens > window:
                game.done, game.out_of_window = True, True
                continue
            prompts.append(ids)
            playing.append((game, env))
        if not playing:
            break
        replies = sampler.generate(prompts, one_reply)
        running = []
        for (game, env), ids in zip(playing, replies):
            reply = tokenizer.decode(ids, skip_special_tokens=True)
            turn = envs.step(env, reply, env_name)
            game.messages += [("assistant", reply), ("user", turn.observation)]
            game.turns += 1
            game.reward += turn.reward
            game.invalid += turn.invalid
            game.done = turn.done
            if not turn.done:
                running.append((game, env))
        if advance:
            advance(len(playing))
        if not running:
            break
    if advance:  # the turns games did not need, so that the bar ends full
        advance(len(games) * max_turns - sum(g.turns for g in games))
    return games


@dataclass(frozen=True)
class GameEvalResult:
    """``opcd eval --env``: the games without the context and, when one is given, with it (the same seeds)."""

    games: int
    max_turns: int
    success: float
    mean_turns: float
    invalid_rate: float
    success_with_context: float | None = None
    mean_turns_with_context: float | None = None
    invalid_rate_with_context: float | None = None
    context_harm: float | None = None  # share of seeds won without the context but lost with it

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def evaluate_games(sampler: Sampler, renderer: ChatRenderer, make_env, env_name: str, seeds: Sequence[int], *,
                   context: str | None, context_as: str, sampling: SamplingOptions, max_turns: int,
                   window: int | None = None, advance=None) -> GameEvalResult:
    kw = dict(context_as=context_as, sampling=sampling, max_turns=max_turns, window=window, advance=advance)
    without = play(sampler, renderer, make_env, env_name, seeds, context=None, **kw)
    plain = GameScores.of(without)
    result = GameEvalResult(len(seeds), max_turns, plain.success, plain.mean_turns, plain.invalid_rate)
    if context:
        with_ctx = play(sampler, renderer, make_env, env_name, seeds, context=context, **kw)
        scores = GameScores.of(with_ctx)
        harm = sum(a.won and not b.won for a, b in zip(without, with_ctx)) / len(seeds)
        result = dataclasses.replace(result, success_with_context=scores.success,
                                     mean_turns_with_context=scores.mean_turns,
                                     invalid_rate_with_context=scores.invalid_rate, context_harm=harm)
    return result
