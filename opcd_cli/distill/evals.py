"""The evaluations of a run, greedy: the student before and after training (without the context, with it,
out of distribution), and a separate teacher with the context; with ``--env``, evaluation games. Every
sampler given here samples for the whole world (``Samplers.evaluation``)."""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import models
from ..config import SamplingOptions
from ..evaluate import evaluate_model, passes, score
from ..games import GameEvalResult, GameScores, evaluate_games, play, plays
from ..prompts import ChatRenderer
from ..sampling import Sampler
from ..ui import UI
from .records import Run


def greedy(run: Run) -> SamplingOptions:
    longest = run.cfg.evaluation.eval_max_new_tokens or run.cfg.sampling.max_new_tokens
    return SamplingOptions(temperature=0.0, max_new_tokens=longest)


def evaluates(run: Run) -> bool:
    """Whether the run has an evaluation: rows to score, or evaluation games to play."""
    return bool(run.eval_examples) or (run.cfg.plays_games and run.cfg.games.eval_games > 0)


def play_eval_games(run: Run, sampler: Sampler, renderer: ChatRenderer, ui: UI, title: str, context: str | None,
                    ood: bool) -> GameEvalResult:
    """Greedy games on the evaluation seeds: without the context, with it when given, and out of distribution."""
    cfg, setup, n = run.cfg, run.games, run.cfg.games.eval_games
    ood_setup = setup.ood if ood else None
    with ui.progress(), models.autocast(cfg.loading.dtype):
        torch.manual_seed(cfg.seed)
        advance = ui.task(title, plays(n, setup.max_turns, context is not None, ood_setup is not None))
        return evaluate_games(sampler, renderer, setup.make_env, setup.name, list(range(n)),
                              context=context, context_as=cfg.context_as, sampling=greedy(run),
                              max_turns=setup.max_turns, window=setup.window, advance=advance, ood=ood_setup)


def evaluate_teacher(run: Run, ui: UI, sampler: Sampler) -> float:
    """The teacher's greedy accuracy on the eval split with the context (a teacher other than the student); with
    ``--env``, its success in the evaluation games."""
    cfg = run.cfg
    if cfg.plays_games:
        seeds = list(range(cfg.games.eval_games))
        games = play(sampler, run.teacher_renderer, run.games.make_env, run.games.name, seeds, context=run.context, context_as=cfg.context_as, sampling=greedy(run),
                     max_turns=run.games.max_turns, window=run.games.window)
        return GameScores.of(games).success
    with ui.progress(), models.autocast(cfg.loading.dtype):
        torch.manual_seed(cfg.seed)
        advance = ui.task("eval before: teacher with context", len(run.eval_examples))
        return score(sampler, run.teacher_renderer, run.eval_examples, context=run.context, context_as=cfg.context_as,
                     sampling=greedy(run), verifier=cfg.evaluation.verifier, advance=advance).accuracy


def evaluate_student(run: Run, sampler: Sampler, ui: UI, when: str, teacher_score: float | None = None):
    """The student's greedy ``EvalResult`` on the eval split (without and with the context) and the OOD split.

    Before training, the teacher's accuracy with the context goes in too: measured for a separate teacher,
    and for the default teacher (the student's frozen initial weights) the student's own with the context.
    """
    cfg = run.cfg
    if not evaluates(run):
        return None
    was_training = run.student.training
    run.student.eval()
    try:
        if cfg.plays_games:
            result = play_eval_games(run, sampler, run.student_renderer, ui, f"eval {when}", run.context, True)
        else:
            with ui.progress(), models.autocast(cfg.loading.dtype):
                torch.manual_seed(cfg.seed)
                advance = ui.task(f"eval {when}", passes(run.eval_examples, run.context, run.ood_examples))
                result = evaluate_model(sampler, run.student_renderer, run.eval_examples, context=run.context,
                                        context_as=cfg.context_as, sampling=greedy(run),
                                        verifier=cfg.evaluation.verifier, ood=run.ood_examples, advance=advance)
    finally:
        run.student.train(was_training)
    if when == "before":  # games: the same two fields under their games names
        own = result.success_with_context if cfg.plays_games else result.accuracy_with_context
        teacher = teacher_score if cfg.teacher is not None else own
        field = "teacher_success_with_context" if cfg.plays_games else "teacher_accuracy_with_context"
        result = replace(result, **{field: teacher})
    return result
