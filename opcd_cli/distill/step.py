"""One training step: the step's sequences, the passes and the loss micro-batch by micro-batch, the gradient,
the optimiser step, and the step's numbers.

On-policy (the default) the student answers the step's prompts without the context (``--samples-per-prompt``
times each); the teacher scores the same tokens with the context; the student descends the mean over response
tokens of the objective (the top-k reverse KL by default; plus the reward's policy-gradient term, the
regulariser and the anchor when asked). Off-policy the responses and the targets are the teacher's. With
``--env`` the step's sequences are the replies of games played to their end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .. import distributed, models, teachers
from ..checkpoint import step_prompts
from ..config import DistillConfig
from ..errors import OpcdError
from ..escape import EscapeGuard
from ..games import Game, game_seeds, play, turn_views, window_warning
from ..outputs import RunDir
from ..prompts import Views
from ..verifiers import is_correct
from ..sampling import Sampler
from ..timing import StepTimer
from ..ui import UI
from .passes import micro_batches
from .records import Run, Training
from .report import step_record
from .samplers import Samplers


@dataclass
class Sequences:
    """A step's training sequences on this rank: each a prompt in both views and a response to it."""

    views: list[Views]
    responses: list[list[int]]
    rows: list[int] | None = None  # dataset rows (off-policy: where their saved targets are)
    games: list[Game] | None = None  # --env: the games the replies come from
    rewards: list[float] | None = None  # --reward-weight: each sample's reward (a response to a row, or a game)
    advantages: list[float] | None = None  # ...and each sequence's advantage within its group (a game's turns share it)


@dataclass(frozen=True)
class StepCounts:
    """What a step's responses add up to, over every rank."""

    tokens: int  # response tokens
    ends: int  # responses that ended by themselves
    responses: int
    won: int  # games won
    out_of_window: int  # games ended for want of room in the window
    reward: float  # the samples' rewards (with --reward-weight; a game's once)
    samples: int  # the samples rewarded: responses to rows, or games


def new_training(run: Run) -> Training:
    """AdamW over the trainable weights, with the learning-rate schedule, at step 0."""
    cfg = run.cfg
    optimizer = torch.optim.AdamW([p for p in run.student.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    return Training(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)))


def take_step(run: Run, training: Training, samplers: Samplers, rollouts, step: int, guard: EscapeGuard,
              timer: StepTimer, ui: UI, train_start: float) -> dict:
    """Step ``step``: sequences, passes, loss and gradient, then the optimiser step unless the top-k mass
    escaped with ``--stop-on-escape``; returns the step's line of ``metrics.jsonl``."""
    cfg, student, step_start = run.cfg, run.student, time.time()
    # 1. this rank's share of the step's prompts, and their responses: the student's own, sampled without the
    # context (or, off-policy, the teacher's); with --env, the replies of games played to the end
    with timer.phase("rollouts"):
        seqs = step_sequences(run, samplers.player or samplers.training, rollouts, step)
        if cfg.loss.reward_weight > 0:  # the verifier's reward on each sample, and its advantage in its group
            seqs.rewards, seqs.advantages = rewards_and_advantages(run, seqs)
    counts = step_counts(run, seqs)
    distinct = distinct_tokens(seqs.responses, run.loss.vocab, models.device())
    # 2-3. the teacher scores the same tokens with the context; the loss, micro-batch by micro-batch
    run.loss.consistency_weight = cfg.loss.consistency_weight_at(step)
    run.loss.anchor_weight = cfg.loss.anchor_weight_at(step)
    sums = forward_loss_backward(run, seqs, rollouts, counts.tokens, timer)
    # 4. one optimiser step, unless the loss or the gradient is not finite; the sampler follows
    with timer.phase("optimizer"):
        grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.max_grad_norm))
    values = step_values(step, counts.tokens, sums, grad_norm, run.out)  # the step's one host sync
    # the same mass on every rank: the same decision
    escape = guard.check(step, values["topk_mass"]) if values["topk_mass"] is not None else None
    if escape is not None:
        training.escape = escape
        ui.info(f"[yellow]warning:[/] {escape.message()}")
    if escape is None or not escape.stopped:
        with timer.phase("optimizer"):
            training.optimizer.step()
            training.schedule.step()
            training.optimizer.zero_grad(set_to_none=True)
        if cfg.on_policy:
            with timer.phase("weight_push"):
                samplers.training.update_weights(student)
        teachers.after_step(cfg.teacher_kind, run.teacher, student, cfg.ema_decay, run.teacher_prefix)
    record = step_record(step, counts.tokens, counts.ends, counts.responses, values, training.schedule, step_start,
                         train_start, timer.seconds())
    record["distinct_tokens"] = round(distinct / counts.tokens, 4) if counts.tokens else None
    if cfg.loss.consistency_weight > 0:  # the regulariser's weight this step (scheduled or not)
        record["consistency_weight"] = run.loss.consistency_weight
    if cfg.loss.anchor_weight > 0:  # the anchor's weight this step
        record["anchor_weight"] = run.loss.anchor_weight
    if cfg.loss.reward_weight > 0:  # the samples' mean reward and the reward's term of the loss
        record |= {"reward": counts.reward / counts.samples if counts.samples else None,
                   "reward_loss": values["reward_loss"]}
    if cfg.plays_games:  # how the step's games went (on-policy: the student's, without the context)
        games = cfg.per_step * cfg.optim.samples_per_prompt
        record |= {"games_won": counts.won / games, "turns": counts.responses / games,
                   "games_out_of_window": counts.out_of_window}
        if counts.out_of_window and not any(m.get("games_out_of_window") for m in training.metrics):
            ui.info(window_warning(counts.out_of_window, f"of step {step}"))
    return record


def step_sequences(run: Run, sampler: Sampler, rollouts, step: int) -> Sequences:
    """This rank's share of the step's prompts and their responses (all of them, as one process)."""
    cfg, world = run.cfg, distributed.world()
    repeat = lambda ids: [i for i in ids for _ in range(cfg.optim.samples_per_prompt)]  # noqa: E731 (a group each)
    if cfg.plays_games:
        return play_games(run, sampler, repeat(distributed.local_share(game_seeds(step, cfg.per_step), world)))
    batch = repeat(distributed.local_share(step_prompts(len(run.examples), cfg.seed, step, cfg.per_step), world))
    if rollouts is not None:
        return Sequences([run.views[i] for i in batch], [rollouts.responses[i] for i in batch], batch)
    with models.autocast(cfg.loading.dtype):
        responses = sampler.generate([run.views[i].student_ids for i in batch], cfg.sampling)
    return Sequences([run.views[i] for i in batch], responses, batch)


def play_games(run: Run, sampler: Sampler, seeds: list[int]) -> Sequences:
    """Games played to their end, each reply a training row: on-policy, the student plays without the context;
    off-policy, the teacher (``sampler`` serves it) plays with it. The rows' views are the chat up to each
    reply, checked turn by turn."""
    cfg, setup = run.cfg, run.games
    # several processes: a sharded model's passes are collective, so every process generates as many turns
    in_step = ((lambda playing: distributed.any_rank(playing, models.device())) if distributed.world().active
               else None)
    with models.autocast(cfg.loading.dtype):
        games = play(sampler, run.student_renderer if cfg.on_policy else run.teacher_renderer, setup.make_env,
                     setup.name, seeds, context=None if cfg.on_policy else run.context, context_as=cfg.context_as,
                     sampling=cfg.sampling, max_turns=setup.max_turns, window=setup.window, in_step=in_step)
    views, responses = [], []
    for game in games:
        turns = turn_views(game, run.context, cfg.context_as, run.student_renderer, run.teacher_renderer)
        prefix = run.teacher_prefix.ids if run.teacher_prefix is not None else []
        if any(list(v.teacher_ids[: len(prefix)]) != prefix for v in turns):
            raise OpcdError(f"game {game.seed}: a teacher prompt does not start with the context's rendering that "
                            "the first turn had; run with --no-teacher-prefix-cache")
        views += turns
        responses += [reply for _, reply in game.replies]
    return Sequences(views, responses, games=games)


def rewards_and_advantages(run: Run, seqs: Sequences) -> tuple[list[float], list[float]]:
    """Each sample's reward (the verifier's on a response to a row, as ``opcd eval`` scores it; with ``--env``, a
    game's reward) and each sequence's advantage: its sample's reward less its group's mean (the
    ``--samples-per-prompt`` samples of one prompt or game seed), over the group's standard deviation too with
    ``--reward-std``; a game's turns share its advantage."""
    cfg, n = run.cfg, run.cfg.optim.samples_per_prompt
    if seqs.games is not None:
        per_sample = [g.reward for g in seqs.games]
        turns = [len(g.replies) for g in seqs.games]
    else:
        decode = run.tokenizer.decode
        per_sample = [float(is_correct(decode(r, skip_special_tokens=True), run.examples[row].answer,
                                       run.examples[row].verifier, cfg.evaluation.verifier))
                      for r, row in zip(seqs.responses, seqs.rows)]
        turns = [1] * len(per_sample)
    rewards = torch.tensor(per_sample, dtype=torch.float64).view(-1, n)
    advantages = rewards - rewards.mean(1, keepdim=True)
    if cfg.loss.reward_std:  # as TRL's GRPO: the groups' unbiased standard deviation, and a small floor
        advantages = advantages / (rewards.std(1, keepdim=True) + 1e-4)
    return per_sample, [a for a, t in zip(advantages.flatten().tolist(), turns) for _ in range(t)]


def step_counts(run: Run, seqs: Sequences) -> StepCounts:
    """The step's ``StepCounts``, summed over every rank."""
    responses, games, rewards = seqs.responses, seqs.games or [], seqs.rewards or []
    counts = [sum(map(len, responses)), sum(finished(r, run.stop_ids) for r in responses), len(responses),
              sum(g.won for g in games), sum(g.out_of_window for g in games), sum(rewards), len(rewards)]
    if distributed.world().active:
        counts = distributed.all_sum(torch.tensor(counts, dtype=torch.float64, device=models.device())).tolist()
    return StepCounts(*(int(c) for c in counts[:5]), float(counts[5]), int(counts[6]))


def distinct_tokens(responses: list[list[int]], vocab: int, device) -> int:
    """How many different token ids the step's responses hold, over every rank (ids past the shared vocabulary
    count as its last)."""
    ids = [min(max(t, 0), vocab - 1) for r in responses for t in r]
    if not distributed.world().active:
        return len(set(ids))
    present = torch.zeros(vocab, device=device)
    if ids:
        present[torch.tensor(ids, device=device)] = 1.0
    return int(distributed.all_max_tensor(present).sum().item())


def forward_loss_backward(run: Run, seqs: Sequences, rollouts, n_tokens: int, timer: StepTimer) -> torch.Tensor:
    """Score this rank's responses micro-batch by micro-batch (the passes forward, the loss) and accumulate the
    gradient of the mean loss over the step's ``n_tokens`` response tokens (every rank's); returns the sums over
    every rank of (loss, distillation term, consistency term, anchor term, reward term, top-k mass, student
    entropy, teacher entropy, what was differentiated) over response tokens, then the tokens the mass and each
    entropy were measured on, the padding positions and all positions the passes read."""
    device = models.device()
    scale = distributed.world().size / n_tokens  # FSDP averages the ranks' gradients: the sum over ranks is wanted
    sums, zero = torch.zeros(9, device=device), torch.zeros((), device=device)
    counts = [0, 0, 0, 0, 0]  # tokens with the mass, the student's entropy, the teacher's; padding; positions
    for micro_batch, weight in micro_batches(run, seqs.views, seqs.responses):
        parts, inputs, answers = micro_batch_loss(run, seqs, micro_batch, rollouts, timer)
        with timer.phase("backward"):
            (parts.total * scale * weight).backward()
        if not weight:  # a pass that only keeps this rank in step with the others: it adds nothing
            continue
        n = sum(map(len, answers))
        student_h, teacher_h = parts.entropies or (None, None)
        optional = lambda x: zero if x is None else x * n  # noqa: E731
        reward = zero if parts.reward is None else parts.reward
        # the loss reported is the sum of the terms' values (a policy-gradient surrogate's own value means little)
        sums += torch.stack([parts.distill + parts.consistency + parts.anchor + reward, parts.distill,
                             parts.consistency, parts.anchor, reward, optional(parts.topk_mass),
                             optional(student_h), optional(teacher_h), parts.total.detach()])
        for i, value in enumerate((parts.topk_mass, student_h, teacher_h)):
            counts[i] += n if value is not None else 0
        counts[3] += sum(p.padding for p in inputs)
        counts[4] += sum(p.positions for p in inputs)
    return distributed.all_sum(torch.cat([sums, torch.tensor(counts, dtype=sums.dtype, device=device)]))


def micro_batch_loss(run: Run, seqs: Sequences, micro_batch, rollouts, timer: StepTimer):
    """One micro-batch's passes and loss: (its ``LossParts``, the passes' inputs, its responses)."""
    cfg = run.cfg
    order, rows = [i for row in micro_batch for i in row], [len(row) for row in micro_batch]
    these, answers = [seqs.views[i] for i in order], [seqs.responses[i] for i in order]
    student_in = run.packer([v.student_ids for v in these], answers, rows)
    inputs = [student_in]
    with models.autocast(cfg.loading.dtype):
        if cfg.on_policy:  # the teacher reads the context; with the regulariser the student does too
            teacher_in = run.packer([v.teacher_ids for v in these], answers, rows, run.teacher_prefix)
            context_in = (run.packer([v.student_context_ids for v in these], answers, rows)
                          if run.loss.reads_context else None)
            inputs += [teacher_in] + ([context_in] if context_in is not None else [])
            device = student_in.input_ids_BT.device  # the tokens in the order the passes predict them
            ids_N = torch.tensor([t for a in answers for t in a], dtype=torch.long, device=device)
            advantages_N = None if seqs.advantages is None else torch.tensor(
                [seqs.advantages[i] for i, a in zip(order, answers) for _ in a], dtype=torch.float32, device=device)
            return run.loss.on_policy(student_in, teacher_in, context_in, timer, ids_N, advantages_N), inputs, answers
        if rollouts is not None:
            rows = [seqs.rows[i] for i in order]
            ids_Nk, logprobs_Nk = rollouts.targets(rows, cfg.loss.off_policy_loss, models.device())
        else:  # games the teacher has just played: it scores its replies now
            with timer.phase("teacher_forward"):
                teacher_in = run.packer([v.teacher_ids for v in these], answers, rows)
                ids_Nk, logprobs_Nk = run.loss.teacher_targets(teacher_in, cfg.loss.off_policy_loss == "sft", answers)
            inputs.append(teacher_in)
        return run.loss.off_policy(student_in, ids_Nk, logprobs_Nk, timer), inputs, answers


def step_values(step: int, n_tokens: int, sums: torch.Tensor, grad_norm: torch.Tensor, out: RunDir) -> dict:
    """The step's loss terms and gradient norm as numbers; a non-finite one stops the run before the step is
    applied (so the model is never broken and nothing samples from it)."""
    numbers = torch.cat([sums, grad_norm.reshape(1)]).tolist()
    loss, distill_loss, consistency_loss, anchor_loss, reward_loss = (x / n_tokens for x in numbers[:5])
    mass, student_h, teacher_h, differentiated = numbers[5:9]
    mass_tokens, student_tokens, teacher_tokens, padding, positions, norm = numbers[9:]
    if not math.isfinite(differentiated):  # a surrogate's own value is not reported, but it must be finite too
        loss = differentiated
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise OpcdError(f"step {step}: the loss is {loss} and the gradient norm {norm}: training diverged and stopped "
                        f"before this step was applied; the metrics and checkpoints so far are in {out.partial} "
                        "(try a lower --lr)")
    return {"loss": loss, "distill_loss": distill_loss, "consistency_loss": consistency_loss,
            "anchor_loss": anchor_loss, "reward_loss": reward_loss,
            "topk_mass": mass / mass_tokens if mass_tokens else None,
            "student_entropy": student_h / student_tokens if student_tokens else None,
            "teacher_entropy": teacher_h / teacher_tokens if teacher_tokens else None,
            "grad_norm": norm, "padding_share": padding / positions if positions else 0.0}


def finished(response: list[int], stop: set[int]) -> bool:
    return bool(response) and response[-1] in stop


def lr_lambda(cfg: DistillConfig):
    def factor(step: int) -> float:
        if step < cfg.optim.warmup_steps:
            return (step + 1) / cfg.optim.warmup_steps
        progress = (step - cfg.optim.warmup_steps) / max(1, cfg.optim.steps - cfg.optim.warmup_steps)
        if cfg.optim.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.optim.lr_schedule == "linear":
            return 1 - progress
        return 1.0

    return factor
