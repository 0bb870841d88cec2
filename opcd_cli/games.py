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
from .prompts import ChatRenderer, Views, aligned_views, with_context
from .sampling import Sampler


# where each use's game seeds start, apart from one another: evaluation (opcd eval --env, and opcd distill's
# before and after) from 0, opcd distill's training games, opcd extract's validation and training games
TRAIN_GAME_SEEDS, EXTRACT_VAL_SEEDS, EXTRACT_TRAIN_SEEDS = 1_000_000, 2_000_000, 3_000_000


def game_seeds(step: int, per_step: int) -> list[int]:
    """The seeds of a distillation step's games: new games every step, never the evaluation's."""
    first = TRAIN_GAME_SEEDS + (step - 1) * per_step
    return list(range(first, first + per_step))


@dataclass
class Game:
    """One game: its seed, the chat so far, and how it went."""

    seed: int
    messages: list[tuple[str, str]] = field(default_factory=list)  # (role, text): observations and replies
    reward: float = 0.0
    turns: int = 0
    invalid: int = 0  # replies without a move the environment could read
    invalid_turns: list[bool] = field(default_factory=list)  # which of the replies they were
    done: bool = False
    out_of_window: bool = False
    replies: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt ids, reply ids) per turn

    @property
    def won(self) -> bool:
        return self.reward > 0


@dataclass(frozen=True)
class GameSetup:
    """``opcd distill --env``: the environment, how many turns a game may take, the window a game's prompt and
    reply must fit (what the context adds to the teacher's prompts kept free), and the games out of
    distribution: (make_env, their context) or None."""

    name: str
    make_env: Callable[[], envs.Environment]
    max_turns: int
    window: int | None
    ood: tuple | None = None


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
         window: int | None = None, advance: Callable[[int], None] | None = None,
         in_step: Callable[[bool], bool] | None = None) -> list[Game]:
    """Play one game per seed; ``advance(k)`` is called as replies are made, and at the end with the turns
    the games did not need (``len(seeds) * max_turns`` in all). ``in_step(playing)`` (several processes, each
    playing its own games with a sharded model): whether any process still plays; a process whose games have
    ended generates for a stand-in prompt while others play, so that every process runs as many passes."""
    tokenizer = renderer.tokenizer
    games, running = [Game(seed) for seed in seeds], []
    for game in games:
        env = make_env()
        game.messages.append(("user", envs.reset(env, game.seed, env_name)))
        running.append((game, env))
    one_reply = dataclasses.replace(sampling, n=1)
    stand_in = None  # the last prompt this process generated for
    for _ in range(max_turns):
        prompts, playing = [], []
        for game, env in running:
            ids = renderer.prompt_ids(with_context(tuple(game.messages), context, context_as))
            if window is not None and len(ids) + sampling.max_new_tokens > window:
                game.done, game.out_of_window = True, True
                continue
            prompts.append(ids)
            playing.append((game, env))
        if in_step is not None and not in_step(bool(playing)):
            break  # every process's games have ended
        if not playing:
            if in_step is None or stand_in is None:
                break
            sampler.generate([stand_in], one_reply)  # a pass that only keeps this process in step
            continue
        stand_in = prompts[0]
        replies = sampler.generate(prompts, one_reply)
        running = []
        for (game, env), prompt_ids, ids in zip(playing, prompts, replies):
            reply = tokenizer.decode(ids, skip_special_tokens=True)
            turn = envs.step(env, reply, env_name)
            game.replies.append((prompt_ids, list(ids)))
            game.messages += [("assistant", reply), ("user", turn.observation)]
            game.turns += 1
            game.reward += turn.reward
            game.invalid += turn.invalid
            game.invalid_turns.append(turn.invalid)
            game.done = turn.done
            if not turn.done:
                running.append((game, env))
        if advance:
            advance(len(playing))
        if not running and in_step is None:
            break
    if advance:  # the turns games did not need, so that the bar ends full
        advance(len(games) * max_turns - sum(g.turns for g in games))
    return games


def turn_views(game: Game, context: str | None, context_as: str, student: ChatRenderer,
               teacher: ChatRenderer) -> list[Views]:
    """Each reply of a game as a training row: the chat up to that turn (the observations as user turns, the
    earlier replies as assistant turns), without the context for the student and with it for the teacher.
    The reply is the row's response, so the loss covers the model's turns and never the environment's; each
    turn's views are checked for alignment with its reply, as a dataset row's are with its answer."""
    return [aligned_views(tuple(game.messages[: 2 * t + 1]), context, context_as, student, teacher,
                          game.messages[2 * t + 1][1], f"game {game.seed}, turn {t + 1}")
            for t in range(game.turns)]


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
    ood_success: float | None = None  # games out of distribution, with their own context
    teacher_success_with_context: float | None = None  # the teacher of a distillation run, with the context
    out_of_window: int | None = None  # games ended (lost) because their next prompt and a reply could not fit

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def evaluate_games(sampler: Sampler, renderer: ChatRenderer, make_env, env_name: str, seeds: Sequence[int], *,
                   context: str | None, context_as: str, sampling: SamplingOptions, max_turns: int,
                   window: int | None = None, advance=None, ood=None) -> GameEvalResult:
    """The games without the context and, when given, with it; ``ood``: (make_env, context) of games out of
    distribution, played on the same seeds with their own context."""
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
    played = without + (with_ctx if context else [])
    if ood is not None:
        ood_env, ood_context = ood
        games = play(sampler, renderer, ood_env, env_name, seeds, context=ood_context, **kw)
        result = dataclasses.replace(result, ood_success=GameScores.of(games).success)
        played += games
    cut = sum(g.out_of_window for g in played)
    return dataclasses.replace(result, out_of_window=cut or None)


def window_warning(count: int, where: str) -> str:
    """The line that says games ended for want of room in the model's window (they count as lost)."""
    return (f"[yellow]warning:[/] {count} game(s) {where} ended when their next prompt and a reply could not fit "
            "the model's window; they count as lost: lower --max-turns or --max-new-tokens, or shorten the "
            "environment's observations")


def plays(games: int, max_turns: int, context: bool, ood: bool) -> int:
    """How many replies ``evaluate_games`` can make at most (for a progress bar)."""
    return games * max_turns * (1 + context + ood)
