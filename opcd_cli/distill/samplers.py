"""Which engine serves which model, decided once: ``open_samplers`` for the two times a run samples.

Before the student's engine starts, a separate teacher (``--teacher``) is scored with the context and,
off-policy, writes its rollouts; with vLLM one engine serves both and is closed before the student's starts.
Then the student's phase: the training rollouts (on-policy they follow the weights), the off-policy player of
games, the default teacher's rollouts and the evaluations. Under vLLM one engine serves every role it can (the
default teacher is the student's initial weights); Hugging Face samplers are made per role, each with the
batch size of its work. The samplers that sample for the whole world (evaluations, rollouts) split their
prompts across the processes; those of the training step sample this rank's own share.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import distributed, models
from ..sampling import Sampler, make_sampler
from .evals import evaluates
from .records import Run


@dataclass
class Samplers:
    """The samplers of one phase of a run; a role the phase has no work for is None."""

    training: Sampler | None = None  # the student's rollouts, this rank's share (on-policy: following training)
    player: Sampler | None = None  # off-policy games: what serves the teacher as it plays, this rank's share
    rollouts: Sampler | None = None  # off-policy rows: what writes the teacher's rollouts, split across ranks
    evaluation: Sampler | None = None  # the evaluations (the student's; the teacher's before), split across ranks

    def follow(self, model) -> None:
        """The student's samplers sample from ``model`` from now on (after a merge, or off-policy training)."""
        for sampler in {id(s): s for s in (self.training, self.evaluation) if s is not None}.values():
            sampler.update_weights(model)

    def close(self) -> None:
        """Every engine closed once (a vLLM engine holds its share of memory until closed)."""
        engines = [s.sampler if isinstance(s, distributed.SplitAcrossRanks) else s
                   for s in (self.training, self.player, self.rollouts, self.evaluation)]
        for engine in {id(e): e for e in engines if e is not None}.values():
            engine.close()


def open_samplers(run: Run, phase: str, rollouts=None) -> Samplers:
    """The samplers of ``phase``: ``"teacher"`` (a separate teacher's evaluation before training and, off-policy,
    its rollouts of the rows; none when it has no such work) or ``"student"`` (everything after it, the default
    teacher's rollouts included when the run has no ``rollouts`` yet)."""
    cfg, whole = run.cfg, (lambda s: distributed.SplitAcrossRanks(s, distributed.world()))
    vllm = cfg.engine.sampler == "vllm"
    writes_rollouts = not cfg.on_policy and not cfg.plays_games and rollouts is None
    if phase == "teacher":
        scores = cfg.teacher is not None and cfg.evaluation.eval_before and evaluates(run)
        writes_rollouts = writes_rollouts and cfg.teacher is not None
        batch = cfg.evaluation.eval_batch_size
        engine = new_sampler(run, "teacher", batch) if vllm and (scores or writes_rollouts) else None
        return Samplers(evaluation=whole(engine or new_sampler(run, "teacher", batch)) if scores else None,
                        rollouts=whole(engine or new_sampler(run, "teacher", cfg.per_step)) if writes_rollouts else None)
    # the default teacher's rollouts come first: under vLLM its engine (the student's initial weights) samples
    # them and then trains
    training = new_sampler(run, "student", cfg.per_step) if vllm and writes_rollouts else None
    writer = (training or new_sampler(run, "teacher", cfg.per_step)) if writes_rollouts else None
    training = training or new_sampler(run, "student", cfg.per_step, follows_training=cfg.on_policy)
    player = None
    if cfg.plays_games and not cfg.on_policy:  # vLLM and the default teacher: the engine on the initial weights
        player = training if vllm and cfg.teacher is None else new_sampler(run, "teacher", cfg.per_step)
    evaluation = training if vllm else new_sampler(run, "student", cfg.evaluation.eval_batch_size)
    return Samplers(training, player, whole(writer) if writer else None, whole(evaluation))


def new_sampler(run: Run, which: str, batch_size: int, follows_training: bool = False) -> Sampler:
    """A sampler (``--sampler``) for the student or the teacher; vLLM loads the model's own folder (the
    frozen-copy teacher's is the student's)."""
    cfg = run.cfg
    model, tokenizer = ((run.student, run.tokenizer) if which == "student"
                        else (run.teacher, run.teacher_renderer.tokenizer))
    source = cfg.student if which == "student" else (cfg.teacher or cfg.student)
    padded = models.output_rows(model) > run.loss.vocab  # a teacher may have rows the student lacks
    return make_sampler(cfg.engine.sampler, tokenizer=tokenizer, model=model, source=source, batch_size=batch_size,
                        loading=cfg.loading, vllm_memory=cfg.engine.vllm_memory, vllm_eager=cfg.engine.vllm_eager,
                        seed=cfg.seed,
                        follows_training=follows_training, vocab=run.loss.vocab if padded else None)
