"""Context distillation: the training loop.

    opcd distill --student Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B --context exp.txt --data train.jsonl

Each step (on-policy, the default): the student answers a batch of prompts WITHOUT the context; the frozen
teacher scores the same tokens WITH the context in front; the student descends the mean over response tokens
of the top-k reverse KL(student || teacher), plus, with ``--consistency-weight``, the context-removability
term and, with ``--anchor-weight``, the in-context anchor; the sampler follows the new weights. The step's
top-k mass is watched (``escape.py``). Off-policy (the paper's baseline), the responses are the
teacher's own, written once with the context, and the loss a forward KL over the teacher's saved top-k (or
the tokens' cross-entropy). ``prepare`` does everything that can fail on bad input before anything is
written; ``train`` is the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import distributed, lora, models, teachers, trackers
from . import rollouts as rollout_store
from .checkpoint import (check_state, load_state, save_model, save_state, saved_settings, saved_step,
                         state_folder, step_prompts)
from .config import PERMISSIONS, RESUMABLE, DistillConfig, SamplingOptions
from .data import Example, has_context, jsonl_text, load_examples, read_context, require_answers
from .errors import DiskFull, Interrupted, OpcdError
from .escape import Escape, EscapeGuard
from .evaluate import EvalResult, evaluate_model, passes, score
from .games import (TRAIN_GAME_SEEDS, Game, GameEvalResult, GameScores, GameSetup, evaluate_games, game_seeds, play,
                    plays, turn_views, window_warning)
from .forward import TeacherPrefix, attention_kind, can_reuse_prefix, common_prefix, packing_is_exact
from .loss import DistillLoss
from .micro_batches import MicroBatch, Packer, by_prompts, by_token_budget, sequence_cost, split_to
from .plots import plot_runs
from .outputs import RUN_MARKER, FollowerRunDir, RunDir, write_json_atomic, write_text_atomic
from .prompts import PROBE_RESPONSE, ChatRenderer, Views, aligned_views, build_views
from .sampling import Sampler, make_sampler, stop_ids
from .timing import PHASES, StepTimer
from .ui import UI


@dataclass
class Run:
    """Everything a distillation run needs, loaded and checked."""

    cfg: DistillConfig
    out: RunDir
    examples: list[Example]
    views: list[Views]
    context: str | None
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    student_renderer: ChatRenderer
    teacher_renderer: ChatRenderer
    loss: DistillLoss
    stop_ids: set[int]
    eval_examples: list[Example] | None
    ood_examples: list[Example] | None
    rollouts: rollout_store.Rollouts | None  # off-policy: saved teacher rollouts, when --rollouts holds them
    trainable_parameters: int = 0
    teacher_prefix: TeacherPrefix | None = None  # what every teacher prompt starts with, read once
    packer: Packer | None = None  # makes a micro-batch into each pass's inputs: padded rows or one packed row
    games: GameSetup | None = None  # --env: games played turn by turn instead of dataset rows

    def sampler(self, which: str, batch_size: int, follows_training: bool = False) -> Sampler:
        """A sampler (``--sampler``) for the student or the teacher; vLLM loads the model's own folder (the
        frozen-copy teacher's is the student's)."""
        cfg = self.cfg
        model, tokenizer = (self.student, self.tokenizer) if which == "student" else (
            self.teacher, self.teacher_renderer.tokenizer)
        source = cfg.student if which == "student" else (cfg.teacher or cfg.student)
        padded = models.output_rows(model) > self.loss.vocab  # a teacher may have rows the student lacks
        return make_sampler(cfg.sampler, tokenizer=tokenizer, model=model, source=source, batch_size=batch_size,
                            loading=cfg.loading, vllm_memory=cfg.vllm_memory, vllm_eager=cfg.vllm_eager, seed=cfg.seed,
                            follows_training=follows_training, vocab=self.loss.vocab if padded else None)

    def eval_sampler(self, training: Sampler) -> Sampler:
        """The sampler evaluation uses: the training one for vLLM (one engine, already following the weights),
        else a Hugging Face sampler on the live student with the evaluation batch size. With several
        processes, each generates for its share of the rows and all get every response."""
        sampler = training if training.name == "vllm" else self.sampler("student", self.cfg.eval_batch_size)
        return distributed.SplitAcrossRanks(sampler, distributed.world())


def distill(cfg: DistillConfig, ui: UI, resume: bool = False) -> dict:
    """Run context distillation and return the summary (also written to ``summary.json``). With ``resume``,
    continue the run at ``cfg.output_dir`` (its ``.partial`` folder, or a finished run) from its saved state."""
    started = time.time()
    if cfg.student is None:
        raise OpcdError("give --student (or no model arguments at all, to run the built-in toy world)")
    with terminate_as_interrupt(), distributed.session() as world:
        distributed.agree(lambda: check_world(cfg, world))  # before anything loads; every rank says it
        out = distributed.agree(lambda: open_output(cfg, resume, world))  # checked and locked by rank 0
        final = distributed.broadcast_object(str(out.final) if out else None)
        out = out or FollowerRunDir(final)
        try:
            run = distributed.agree(lambda: prepare(replace(cfg, output_dir=str(out.final)), out, ui))
            return train(distribute(run, world), ui, started, resume)
        except DiskFull as e:
            if saved_state_exists(out.partial):
                raise DiskFull(e.what, e.detail, f"free some space and continue with: opcd distill --resume "
                                                 f"{out.partial}") from None
            raise
        except KeyboardInterrupt as e:
            where = f"; the partial run is in {out.partial}" if out.partial.exists() else ""
            code = 128 + signal.SIGTERM.value if isinstance(e, Terminated) else 130
            raise Interrupted(f"{'terminated' if code != 130 else 'interrupted'}{where}", code=code) from None
        finally:
            out.release()


def saved_state_exists(folder: Path) -> bool:
    return folder.is_dir() and state_folder(folder) is not None


def check_world(cfg: DistillConfig, world: distributed.World) -> None:
    """What several processes need of the settings: a global batch that splits evenly across them."""
    if not world.active:
        return
    per_step = cfg.batch_size * cfg.grad_accum
    if per_step % world.size:
        raise OpcdError(f"the global batch (batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} = {per_step} "
                        f"prompts a step) does not split across {world.size} processes; make it a multiple of "
                        f"{world.size}")


def open_output(cfg: DistillConfig, resume: bool, world: distributed.World) -> RunDir | None:
    """Rank 0 checks and locks the output directory (and, to resume, its saved state); the other ranks write
    through rank 0 only, and get None."""
    if not world.main:
        return None
    out = RunDir(cfg.output_dir or cfg.default_output_dir(), cfg.overwrite, resume=resume, inputs=cfg.inputs())
    if resume:
        try:
            check_resumable(out, cfg.steps)
        except OpcdError:
            out.release()
            raise
    return out


def distribute(run: Run, world: distributed.World) -> Run:
    """The prepared run ready for its world: activations recomputed in the backward pass with
    ``--gradient-checkpointing``; with several processes, the student sharded with FSDP2 (and the teacher too
    with ``--teacher-sharding shard``), and each rank sampling from its own random stream."""
    cfg = run.cfg
    if cfg.gradient_checkpointing:
        run.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not world.active:
        return run
    dtype = models.resolve_dtype(cfg.loading.dtype)
    distributed.shard(run.student, dtype)
    teacher_is_student = run.teacher is run.student or isinstance(run.teacher, lora.AdaptersOff)  # its shards
    if not teacher_is_student and (cfg.teacher_sharding == "shard" or cfg.teacher_kind == "ema"):  # an average:
        distributed.shard(run.teacher, dtype)  # sharded as the student is
    torch.manual_seed(cfg.seed + 1_000_003 * world.rank)  # rank 0's stream is the single process's
    return run


@dataclass
class Training:
    """What the loop changes: the optimiser and its schedule, the step reached, the metrics so far, and the
    evaluation before training (kept in the saved state, so that a resumed run need not redo it)."""

    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    metrics: list[dict] = field(default_factory=list)
    before: EvalResult | None = None
    escape: Escape | None = None  # the step where the student's top-k mass fell below --min-topk-mass


def train(run: Run, ui: UI, started: float, resume: bool = False) -> dict:
    """The distillation run on a prepared ``run``: the teacher's work, the evaluation before, the loop, the final
    model, the evaluation after and the summary."""
    cfg, student, main = run.cfg, run.student, distributed.world().main
    if resume:  # every check before anything moves: a resume that fails leaves the run as it was
        distributed.agree(lambda: check_resume(run))
    out = run.out.reopen() if resume else run.out.begin()
    if main:
        write_json_atomic(out / RUN_MARKER, cfg.to_dict())  # a resumed run's own, with its new --steps
    distributed.barrier()  # the run folder exists for every rank
    inputs = write_inputs(run, out)
    show_prompts(run, ui)
    per_step, sampler = cfg.batch_size * cfg.grad_accum, None
    teacher_score, rollouts = (None, saved_rollouts(run, out)) if resume else teacher_work(run, ui, out)
    player = None  # off-policy games: what serves the teacher as it plays
    try:
        if cfg.mode == "off-policy" and rollouts is None and run.games is None:  # the default teacher: the
            sampler = run.sampler("student", per_step) if cfg.sampler == "vllm" else None  # student's initial
            rollouts = make_rollouts(run, ui, out, sampler or run.sampler("teacher", per_step))  # weights: one engine
        sampler = sampler or run.sampler("student", per_step, follows_training=cfg.mode == "on-policy")
        if run.games is not None and cfg.mode == "off-policy":  # vLLM: the engine on the initial weights serves
            one_engine = cfg.sampler == "vllm" and cfg.teacher is None  # the default teacher
            player = sampler if one_engine else run.sampler("teacher", per_step)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        training = Training(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)))
        if resume:
            restore(run, training, sampler, out)
        elif cfg.eval_before:
            training.before = evaluate_student(run, run.eval_sampler(sampler), ui, "before", teacher_score)
        train_seconds = loop(run, training, sampler, rollouts, out, ui, player)
        student.eval()
        stopped = training.escape is not None and training.escape.stopped
        if cfg.save_every and not stopped:  # a run that keeps checkpoints can be continued with more --steps
            save_training_state(run, training, sampler, out)
        save_student(run, out, final=True)  # a LoRA student is merged in place here, unless --no-merge
        if cfg.mode == "off-policy" or run.student is not student:
            sampler.update_weights(run.student)  # off-policy, the evaluation sampler has not followed training
        after = evaluate_student(run, run.eval_sampler(sampler), ui, "after")
    finally:
        for engine in {id(s): s for s in (sampler, player) if s is not None}.values():
            engine.close()  # a vLLM engine holds its share of memory until closed
    summary = build_summary(run, inputs, training.before, after, training.metrics, sampler, rollouts, started,
                            train_seconds, distributed.gather_objects(peak_memory_gib()), training.escape)
    distributed.barrier()  # every rank has finished before the run is put in place
    if main:
        write_json_atomic(out / "summary.json", summary)
        plot_runs([(run.out.final.name, training.metrics)], out / "metrics.png",
                  title=f"opcd distill: {run.out.final.name}")
        run.out.finish()
    return summary


def loop(run: Run, training: Training, sampler: Sampler, rollouts, out: Path, ui: UI, player: Sampler | None = None) -> float:
    """The steps from ``training.step + 1`` to ``--steps``; returns the seconds they took (``player``: what plays
    off-policy games). SIGINT and SIGTERM stop it after the current step, with the state saved."""
    cfg, student, world = run.cfg, run.student, distributed.world()
    per_step, train_start = cfg.batch_size * cfg.grad_accum, time.time()
    student.train()
    tracker = trackers.open_tracker(cfg.report_to if world.main else "none", out, run.out.final.name, cfg.to_dict())
    timer = StepTimer(models.device())  # one host synchronisation a step, at its end
    guard = EscapeGuard(cfg.min_topk_mass if cfg.mode == "on-policy" else 0.0, cfg.stop_on_escape,
                        student.parameters())
    # the signals are the loop's before metrics.jsonl exists: a signal once it does stops after a step
    with stop_signals() as stop, ui.progress(), metrics_log(out, world) as log, contextlib.closing(tracker):
        advance = ui.task(f"distill ({cfg.mode})", cfg.steps)
        advance(training.step)
        for step in range(training.step + 1, cfg.steps + 1):
            step_start = time.time()
            # 1. this rank's share of the step's prompts, and their responses: the student's own, sampled without
            # the context (or, off-policy, the teacher's); with --env, the replies of games played to the end
            with timer.phase("rollouts"):
                seqs = step_sequences(run, player or sampler, rollouts, step, world)
            tokens, ends, replies, won, cut = step_counts(run, seqs)  # over every rank's responses
            distinct = distinct_tokens(seqs.responses, run.loss.vocab, models.device())
            # 2-3. the teacher scores the same tokens with the context; the loss, micro-batch by micro-batch
            run.loss.consistency_weight = cfg.consistency_weight_at(step)
            sums = backward(run, seqs, rollouts, tokens, timer)
            # 4. one optimiser step, unless the loss or the gradient is not finite; the sampler follows
            with timer.phase("optimizer"):
                grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm))
            values = step_values(step, tokens, sums, grad_norm, run.out)  # the step's one host sync
            escape = guard.check(step, values["topk_mass"])  # the same mass on every rank: the same decision
            if escape is not None:
                training.escape = escape
                ui.info(f"[yellow]warning:[/] {escape.message()}")
            if escape is None or not escape.stopped:
                with timer.phase("optimizer"):
                    training.optimizer.step()
                    training.schedule.step()
                    training.optimizer.zero_grad(set_to_none=True)
                if cfg.mode == "on-policy":
                    with timer.phase("weight_push"):
                        sampler.update_weights(student)
                teachers.after_step(cfg.teacher_kind, run.teacher, student, cfg.ema_decay, run.teacher_prefix)
            # 5. log and checkpoint
            training.step = step
            training.metrics.append(step_record(step, tokens, ends, replies, values, training.schedule, step_start,
                                                train_start, timer.seconds()))
            training.metrics[-1]["distinct_tokens"] = round(distinct / tokens, 4) if tokens else None
            if cfg.consistency_weight > 0:  # the regulariser's weight this step (scheduled or not)
                training.metrics[-1]["consistency_weight"] = run.loss.consistency_weight
            if run.games is not None:  # how the step's games went (on-policy: the student's, without the context)
                training.metrics[-1] |= {"games_won": won / per_step, "turns": replies / per_step,
                                         "games_out_of_window": cut}
                if cut and not any(m.get("games_out_of_window") for m in training.metrics[:-1]):
                    ui.info(window_warning(cut, f"of step {step}"))
            log.write(json.dumps(training.metrics[-1]) + "\n")
            log.flush()
            tracker.log(step, training.metrics[-1])
            escaped = " [yellow](below --min-topk-mass)[/]" if training.escape is not None else ""
            advance(1, status=f"loss {values['loss']:.4f} top-k mass {values['topk_mass']:.3f}{escaped}")
            if escape is not None and escape.stopped:  # the last good weights back, this step not applied
                training.optimizer.zero_grad(set_to_none=True)
                guard.restore()
                sampler.update_weights(student)
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save_student(run, out / "checkpoints" / f"step-{step:06d}")
                save_training_state(run, training, sampler, out)
            if distributed.any_rank(stop.signal is not None, sums.device):  # every rank stops after the same step
                stop.signal = stop.signal or signal.SIGTERM
                save_training_state(run, training, sampler, out)
                raise Interrupted(f"stopped after step {step} of {cfg.steps} ({stop.signal.name}); continue with: "
                                  f"opcd distill --resume {run.out.partial}", code=128 + stop.signal.value)
    return time.time() - train_start


def save_student(run: Run, folder: Path, final: bool = False) -> None:
    """The student in Hugging Face format at ``folder``. A LoRA student saves its adapter in PEFT's format
    (a checkpoint is the adapter alone; the final run has it in ``adapter/``, beside the merged model unless
    ``--no-merge``)."""
    cfg, dtype = run.cfg, models.resolve_dtype(run.cfg.loading.dtype)
    if not lora.is_lora(run.student):
        save_model(run.student, run.tokenizer, folder, dtype)
        return
    base = models.resolve(cfg.student)
    base = str(Path(base).resolve()) if Path(base).is_dir() else base  # loads from anywhere, without opcd
    lora.save_adapter(run.student, run.tokenizer, folder / "adapter" if final else folder, base)
    if final and cfg.merge and distributed.is_sharded(run.student):  # merged as the weights are gathered
        main, base_model = distributed.world().main, run.student.get_base_model()
        first = {n.replace(".base_layer.", ".") for n, _ in base_model.named_parameters() if ".lora_" not in n}
        merged = {name: tensor.cpu() if main else None for name, tensor in lora.plain_weights(run.student)}
        save_model(base_model, run.tokenizer, folder, dtype, state={k: v for k, v in merged.items() if k in first})
    elif final and cfg.merge:  # training is over: merge in place (no second copy of the adapted matrices)
        run.student = run.student.merge_and_unload()
        save_model(run.student, run.tokenizer, folder, dtype)


def teacher_description(cfg: DistillConfig) -> str:
    """What the teacher is, in words (the summary's ``teacher``)."""
    if cfg.teacher_kind == "live":
        return f"{cfg.student} itself, as it trains (live)"
    if cfg.teacher_kind == "ema":
        return f"moving average of {cfg.student} (decay {cfg.ema_decay})"
    return cfg.teacher or (f"{cfg.student} with the adapters off" if cfg.lora_rank else f"frozen copy of {cfg.student}")


def moving_teacher(run: Run):
    """The teacher when its weights are the run's own state (``--teacher-kind ema``), else None."""
    return run.teacher if run.cfg.teacher_kind == "ema" else None


def save_training_state(run: Run, training: Training, sampler: Sampler, out: Path) -> None:
    save_state(out, step=training.step, model=run.student, optimizer=training.optimizer, scheduler=training.schedule,
               metrics=training.metrics, samplers={"student": sampler.state()},
               extra={"before": None if training.before is None else dataclasses.asdict(training.before)},
               teacher=moving_teacher(run), settings=run.cfg.to_dict())


def restore(run: Run, training: Training, sampler: Sampler, out: Path) -> None:
    """Continue from the run's saved state: weights, optimiser, schedule, random states, metrics, and the
    sampler following the restored weights."""
    state = load_state(out, model=run.student, optimizer=training.optimizer, scheduler=training.schedule,
                       teacher=moving_teacher(run))
    training.step, training.metrics = state["step"], list(state["metrics"])
    before = state["extra"].get("before")
    training.before = ((GameEvalResult if "success" in before else EvalResult)(**before)) if before else None
    sampler.set_state(state["samplers"].get("student", {}))
    sampler.update_weights(run.student)
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in training.metrics))


def check_resumable(out: RunDir, steps: int) -> None:
    """Before anything moves: the run to continue has a saved state, short of ``steps``; or, a run stopped after
    its last step's state was saved (killed while saving or scoring the final model), exactly at ``steps``: it
    is completed."""
    stopped = out.partial.is_dir()
    done = saved_step(out.partial if stopped else out.final)
    if done > steps or (done == steps and not stopped):
        least = f"of at least {done} to complete it" if stopped else f"above {done} to train it further"
        raise OpcdError(f"{out.final} has done {done} steps already; give --steps {least}")


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the loop: handled where Ctrl-C is (nothing half-written is kept), exit code 143."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises ``Terminated`` instead of killing the process, so that the run is left as Ctrl-C leaves it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(number, frame):
        raise Terminated()

    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignals:
    """The signal that asked the loop to stop (SIGINT or SIGTERM), or None."""

    signal: signal.Signals | None = None


def metrics_log(out: Path, world):
    """``metrics.jsonl``, opened to append (rank 0); the other ranks write their lines nowhere."""
    return (out / "metrics.jsonl").open("a") if world.main else contextlib.nullcontext(io.StringIO())


@contextlib.contextmanager
def stop_signals():
    """While the loop runs, SIGINT (Ctrl-C) and SIGTERM (what a cluster's preemption sends) only ask it to stop
    after the current step; outside it they act as usual."""
    stop = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def ask(number, frame):
        if stop.signal is not None:  # asked twice: stop now, as outside the loop
            raise Terminated() if number == signal.SIGTERM else KeyboardInterrupt()
        stop.signal = signal.Signals(number)

    # a signal the process was started to ignore (SIGINT in a shell's background job) stays ignored
    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def show_prompts(run: Run, ui: UI) -> None:
    """What each model reads: the rendered teacher and student prompts of the first ``--show-prompts`` rows."""
    shown = ([(f"game {TRAIN_GAME_SEEDS}, turn 1", None, run.views[0])] if run.games is not None
             else [(f"row {e.row}", e.context, v) for e, v in zip(run.examples, run.views)])
    for where, context, views in shown[: run.cfg.show_prompts]:
        teacher_text = run.teacher_renderer.show(views.teacher_ids)
        student_text = run.student_renderer.show(views.student_ids)
        as_text = "; ‹ › marks a control token's string that is plain text here" if "‹" in teacher_text + student_text else ""
        ui.prompt(f"{where}, teacher ({len(views.teacher_ids)} tokens; the context between ⟦ ⟧{as_text})",
                  teacher_text, mark=run.teacher_renderer.controls.mark_text(context or run.context or "") or None)
        ui.prompt(f"{where}, student ({len(views.student_ids)} tokens{as_text})", student_text)


@dataclass
class Sequences:
    """A step's training sequences on this rank: each a prompt in both views and a response to it."""

    views: list[Views]
    responses: list[list[int]]
    rows: list[int] | None = None  # dataset rows (off-policy: where their saved targets are)
    games: list[Game] | None = None  # --env: the games the replies come from


def step_sequences(run: Run, sampler: Sampler, rollouts, step: int, world) -> Sequences:
    """This rank's share of the step's prompts and their responses (all of them, as one process)."""
    cfg = run.cfg
    per_step = cfg.batch_size * cfg.grad_accum
    if run.games is not None:
        return play_games(run, sampler, distributed.local_share(game_seeds(step, per_step), world))
    batch = distributed.local_share(step_prompts(len(run.examples), cfg.seed, step, per_step), world)
    if rollouts is not None:
        return Sequences([run.views[i] for i in batch], [rollouts.responses[i] for i in batch], batch)
    with autocast(cfg.loading.dtype):
        responses = sampler.generate([run.views[i].student_ids for i in batch], cfg.sampling)
    return Sequences([run.views[i] for i in batch], responses, batch)


def play_games(run: Run, sampler: Sampler, seeds: list[int]) -> Sequences:
    """Games played to their end, each reply a training row: on-policy, the student plays without the context;
    off-policy, the teacher (``sampler`` serves it) plays with it. The rows' views are the chat up to each
    reply, checked turn by turn."""
    cfg, setup = run.cfg, run.games
    on_policy = cfg.mode == "on-policy"
    # several processes: a sharded model's passes are collective, so every process generates as many turns
    in_step = ((lambda playing: distributed.any_rank(playing, models.device())) if distributed.world().active
               else None)
    with autocast(cfg.loading.dtype):
        games = play(sampler, run.student_renderer if on_policy else run.teacher_renderer, setup.make_env, setup.name,
                     seeds, context=None if on_policy else run.context, context_as=cfg.context_as,
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


def step_counts(run: Run, seqs: Sequences) -> tuple[int, int, int, int, int]:
    """The step's response tokens, responses that ended by themselves, responses, games won, and games ended
    for want of room in the window, summed over every rank."""
    responses = seqs.responses
    counts = [sum(map(len, responses)), sum(finished(r, run.stop_ids) for r in responses), len(responses),
              sum(g.won for g in seqs.games or []), sum(g.out_of_window for g in seqs.games or [])]
    if not distributed.world().active:
        return tuple(counts)
    summed = distributed.all_sum(torch.tensor(counts, dtype=torch.float64, device=models.device())).tolist()
    return tuple(int(c) for c in summed)


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


def backward(run: Run, seqs: Sequences, rollouts, n_tokens: int, timer: StepTimer) -> torch.Tensor:
    """Score this rank's responses micro-batch by micro-batch and accumulate the gradient of the mean loss over
    the step's ``n_tokens`` response tokens (every rank's); returns the sums over every rank of (loss,
    distillation term, consistency term, anchor term, top-k mass, student entropy, teacher entropy, and the
    tokens each entropy was measured on) over response tokens, then of the padding positions and all positions
    the passes read."""
    cfg, device = run.cfg, models.device()
    views, responses = seqs.views, seqs.responses
    scale = distributed.world().size / n_tokens  # FSDP averages the ranks' gradients: the sum over ranks is wanted
    sums, zero = torch.zeros(7, device=device), torch.zeros((), device=device)
    counts = [0, 0, 0, 0]  # tokens with the student's entropy, with the teacher's, padding positions, positions
    for micro_batch, weight in micro_batches(run, views, responses):
        order, rows = [i for row in micro_batch for i in row], [len(row) for row in micro_batch]
        these, answers = [views[i] for i in order], [responses[i] for i in order]
        student_in = run.packer([v.student_ids for v in these], answers, rows)
        inputs = [student_in]
        with autocast(cfg.loading.dtype):
            if cfg.mode == "on-policy":  # the teacher reads the context; with the regulariser the student does too
                teacher_in = run.packer([v.teacher_ids for v in these], answers, rows, run.teacher_prefix)
                context_in = (run.packer([v.student_context_ids for v in these], answers, rows)
                              if run.loss.reads_context else None)
                inputs += [teacher_in] + ([context_in] if context_in is not None else [])
                parts = run.loss.on_policy(student_in, teacher_in, context_in, timer)
            else:
                if rollouts is not None:
                    ids_Nk, logprobs_Nk = rollouts.targets([seqs.rows[i] for i in order], cfg.off_policy_loss, device)
                else:  # games the teacher has just played: it scores its replies now
                    with timer.phase("teacher_forward"):
                        teacher_in = run.packer([v.teacher_ids for v in these], answers, rows)
                        ids_Nk, logprobs_Nk = run.loss.teacher_targets(teacher_in, cfg.off_policy_loss == "sft", answers)
                    inputs.append(teacher_in)
                parts = run.loss.off_policy(student_in, ids_Nk, logprobs_Nk, timer)
        with timer.phase("backward"):
            (parts.total * scale * weight).backward()
        if not weight:  # a pass that only keeps this rank in step with the others: it adds nothing
            continue
        n = sum(map(len, answers))
        student_h, teacher_h = parts.entropies or (None, None)
        sums += torch.stack([parts.total.detach(), parts.distill, parts.consistency, parts.anchor,
                             parts.topk_mass * n, zero if student_h is None else student_h * n,
                             zero if teacher_h is None else teacher_h * n])
        counts[0] += n if student_h is not None else 0
        counts[1] += n if teacher_h is not None else 0
        counts[2] += sum(p.padding for p in inputs)
        counts[3] += sum(p.positions for p in inputs)
    return distributed.all_sum(torch.cat([sums, torch.tensor(counts, dtype=sums.dtype, device=device)]))


def micro_batches(run: Run, views: list[Views], responses: list[list[int]]) -> list[tuple[MicroBatch, int]]:
    """This rank's sequences (indices into ``views``) in micro-batches of rows, each with its weight (1):
    ``--batch-size`` a row each, or one row packed to the token budget (``--micro-batch-tokens``). Sharded ranks
    run their passes together, so every rank runs as many: it splits its micro-batches, and when it has too
    few sequences (games differ in turns), repeats its first with weight 0."""
    cfg = run.cfg
    costs = [sequence_cost(pass_prompt_lengths(cfg, v, run.teacher_prefix), len(r)) for v, r in zip(views, responses)]
    batches = (by_token_budget(costs, cfg.micro_batch_tokens) if run.packer.packed
               else by_prompts(len(views), cfg.batch_size))
    if not distributed.world().active or (run.games is None and not run.packer.packed):
        return [(batch, 1) for batch in batches]  # dataset rows: every rank has as many, in as many batches
    count = distributed.all_max(len(batches), models.device())
    batches = split_to(batches, min(count, len(views)), costs)
    return [(batch, 1) for batch in batches] + [([[0]], 0)] * (count - len(batches))


def pass_prompt_lengths(cfg: DistillConfig, view: Views, prefix: TeacherPrefix | None) -> list[int]:
    """The prompt positions each pass reads for a row: the student's; on-policy (and for games, which the
    teacher scores as it plays them), the teacher's after its cached prefix and, with the regulariser, the
    student's with the context."""
    lengths = [len(view.student_ids)]
    if cfg.mode == "on-policy" or cfg.env is not None:
        lengths.append(len(view.teacher_ids) - (len(prefix) if prefix is not None else 0))
        if cfg.context_pass:
            lengths.append(len(view.student_context_ids))
    return lengths


def make_packer(cfg: DistillConfig, views: list[Views], student, teacher, teacher_name: str,
                prefix: TeacherPrefix | None, pad_id: int) -> Packer:
    """A padded row per sequence by default; with ``--micro-batch-tokens``, sequences packed into one row per
    micro-batch, once the models are seen to keep packed sequences apart and the budget holds the longest
    sequence a step can have."""
    device = models.device()
    if not cfg.micro_batch_tokens:
        return Packer(pad_id, device)
    teacher_reads = cfg.mode == "on-policy" or cfg.env is not None  # off-policy games: it scores its replies
    for model, name in [(student, cfg.student)] + ([(teacher, teacher_name)] if teacher_reads else []):
        if not packing_is_exact(model):
            raise OpcdError(f"--micro-batch-tokens packs sequences into one row, and {name} (attention: "
                            f"{attention_kind(model)}) does not keep them apart there; leave out --micro-batch-tokens")
    longest = max(sequence_cost(pass_prompt_lengths(cfg, v, prefix), cfg.sampling.max_new_tokens) for v in views)
    if cfg.micro_batch_tokens < longest:
        raise OpcdError(f"--micro-batch-tokens {cfg.micro_batch_tokens} cannot hold the longest sequence a micro-batch "
                        f"may get ({longest} positions: its prompt and --max-new-tokens "
                        f"{cfg.sampling.max_new_tokens}); give at least {longest} or leave it out")
    return Packer(pad_id, device, True, prefix is not None and packing_is_exact(teacher, after_prefix=True))


def step_values(step: int, n_tokens: int, sums: torch.Tensor, grad_norm: torch.Tensor, out: RunDir) -> dict:
    """The step's loss terms and gradient norm as numbers; a non-finite one stops the run before the step is
    applied (so the model is never broken and nothing samples from it)."""
    numbers = torch.cat([sums, grad_norm.reshape(1)]).tolist()
    loss, distill_loss, consistency_loss, anchor_loss, mass = (x / n_tokens for x in numbers[:5])
    student_h, teacher_h, student_tokens, teacher_tokens, padding, positions, norm = numbers[5:]
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise OpcdError(f"step {step}: the loss is {loss} and the gradient norm {norm}: training diverged and stopped "
                        f"before this step was applied; the metrics and checkpoints so far are in {out.partial} "
                        "(try a lower --lr)")
    return {"loss": loss, "distill_loss": distill_loss, "consistency_loss": consistency_loss,
            "anchor_loss": anchor_loss, "topk_mass": mass,
            "student_entropy": student_h / student_tokens if student_tokens else None,
            "teacher_entropy": teacher_h / teacher_tokens if teacher_tokens else None,
            "grad_norm": norm, "padding_share": padding / positions if positions else 0.0}


def step_record(step: int, n_tokens: int, ends: int, n_responses: int, values: dict, schedule, step_start: float,
                train_start: float, phases: dict[str, float]) -> dict:
    """One line of ``metrics.jsonl``; ``phases`` the step's seconds by phase (``timing.PHASES``)."""
    return {
        "step": step,
        **{key: values[key] for key in ("loss", "distill_loss", "consistency_loss", "anchor_loss", "topk_mass",
                                        "student_entropy", "teacher_entropy")},
        "response_tokens": n_tokens / n_responses,
        "truncated": (n_responses - ends) / n_responses,
        "lr": schedule.get_last_lr()[0],
        "grad_norm": values["grad_norm"],
        "padding_share": round(values["padding_share"], 4),  # of the positions the step's passes read
        "tokens_per_s": n_tokens / (time.time() - step_start),
        "step_seconds": round(time.time() - step_start, 4),
        "seconds_by_phase": {name: round(phases[name], 4) for name in PHASES if name in phases},
        "seconds": round(time.time() - train_start, 3),
    }


def saved_rollouts(run: Run, out: Path):
    """Off-policy, a resumed run's teacher rollouts: those it saved (or ``--rollouts``), else None."""
    cfg = run.cfg
    folder = Path(cfg.rollouts) if cfg.rollouts else out / "rollouts"
    if cfg.mode != "off-policy" or not (folder / rollout_store.META).is_file():
        return None
    return rollout_store.load(folder, rollouts_fingerprint(cfg, run.context, run.examples, run.views), run.loss.vocab)


def settings_edited(saved: dict | None, now: dict) -> tuple | None:
    """The first setting (key, then, now) that differs between a state's recorded settings and a resumed run's,
    leaving out what a resume may change and the permissions given anew; None when none does (or none were
    recorded)."""
    if saved is None:
        return None
    flat = lambda d: {k: v for k, v in d.items() if not isinstance(v, dict) or k in ("env_options",  # noqa: E731
                      "ood_env_options")} | {k: v for nested in ("sampling", "loading") for k, v in d.get(nested, {}).items()}
    free = set(RESUMABLE) | set(PERMISSIONS) | {"output_dir", "overwrite"}
    then, current = flat(saved), flat(now)
    return next(((k, then[k], current[k]) for k in sorted(then.keys() & current.keys())  # a setting added since
                 if k not in free and then[k] != current[k]), None)  # is at its default, one removed is gone


def input_records(run: Run) -> dict[str, str]:
    """What the run's ``data/`` folder holds: each file's name and its text (the rows as JSONL, the context)."""
    records = {f"{name}.jsonl": jsonl_text(rows) for name, rows in
               (("train", run.examples), ("test", run.eval_examples), ("ood", run.ood_examples)) if rows}
    if run.context is not None:
        records["context.txt"] = run.context + "\n"
    return records


def check_resume(run: Run) -> None:
    """A run to resume: its saved state complete and fitting the models, and the inputs it reads now (``--data``,
    ``--context``, the evaluation rows) the ones it recorded in ``data/`` when it started."""
    source = run.out.partial if run.out.partial.is_dir() else run.out.final
    check_state(source, model=run.student, teacher=moving_teacher(run))
    cfg = run.cfg
    edited = settings_edited(saved_settings(source), cfg.to_dict())
    if edited:
        key, saved, now = edited
        raise OpcdError(f"{source / RUN_MARKER} was edited since its training state was saved ({key}: {saved!r} then, "
                        f"{now!r} now); a resume continues a run with its own settings (only flags change them): put "
                        "the file back as it was")
    given = {"train.jsonl": cfg.data, "test.jsonl": cfg.eval_data, "ood.jsonl": cfg.ood_data, "context.txt": cfg.context}
    for name, text in input_records(run).items():
        recorded = source / "data" / name
        if recorded.is_file() and recorded.read_text(encoding="utf-8") != text:
            raise OpcdError(f"{given[name]} has changed since {run.out.final.name} started (it no longer matches "
                            f"{recorded}); a resumed run reads what it started with: put the original back, or "
                            "start a new run")


def write_inputs(run: Run, out: Path) -> dict[str, str]:
    """The rows and the context the run used, in its ``data/`` folder (written by rank 0); returns their paths."""
    paths = {}
    for file, text in input_records(run).items():
        if distributed.world().main:
            write_text_atomic(out / "data" / file, text)
        paths[file.split(".")[0]] = str(run.out.final / "data" / file)
    return paths


def time_by_phase(metrics: list[dict]) -> dict:
    """Seconds per step by phase, averaged over the steps, and each phase's share of the step time (``other``:
    what no phase holds, such as counting tokens across ranks and logging)."""
    timed = [m for m in metrics if "seconds_by_phase" in m]
    if not timed:
        return {}
    step = sum(m["step_seconds"] for m in timed) / len(timed)
    per_step = {name: sum(m["seconds_by_phase"].get(name, 0.0) for m in timed) / len(timed) for name in PHASES}
    per_step = {name: seconds for name, seconds in per_step.items() if seconds > 0}
    per_step["other"] = max(0.0, step - sum(per_step.values()))
    return {"step_seconds": round(step, 4), "seconds": {k: round(v, 4) for k, v in per_step.items()},
            "shares": {k: round(v / step, 4) if step > 0 else 0.0 for k, v in per_step.items()}}


def peak_memory_gib() -> float:
    """This process's peak memory so far: the GPU's allocated memory, or the resident memory on a CPU (Linux's
    VmHWM: ``ru_maxrss`` would carry over the peak of a parent that forked this process)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024**2  # KiB
    except (OSError, StopIteration, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def build_summary(run: Run, inputs: dict, before: EvalResult | None, after: EvalResult | None,
                  metrics: list[dict], sampler: Sampler, rollouts, started: float, train_seconds: float,
                  peak_memory: list[float], escape: Escape | None = None) -> dict:
    cfg = run.cfg
    last = metrics[-1] if metrics else {}
    return {
        "output_dir": str(run.out.final),
        "mode": cfg.mode,
        **({"env": cfg.env, "max_turns": cfg.max_turns} if cfg.env else {}),
        "student": cfg.student,
        "teacher": teacher_description(cfg),
        "teacher_kind": cfg.teacher_kind,
        "ema_decay": cfg.ema_decay if cfg.teacher_kind == "ema" else None,
        "trainable_parameters": run.trainable_parameters,
        "lora": None if cfg.lora_rank is None else {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or 2 * cfg.lora_rank,
                                                    "targets": cfg.lora_targets, "merged": cfg.merge},
        "steps": cfg.steps,
        "seconds": round(time.time() - started, 1),
        "train_seconds": round(train_seconds, 1),
        "world_size": distributed.world().size,
        "peak_memory_gib_by_rank": [round(gib, 3) for gib in peak_memory],
        "final_loss": last.get("loss"),
        "final_topk_mass": last.get("topk_mass"),
        "topk_tail": cfg.topk_tail,
        "topk_support": cfg.topk_support,
        "min_topk_mass": cfg.min_topk_mass,
        "topk_mass_escape": None if escape is None else escape.to_dict(),
        "time_by_phase": time_by_phase(metrics),
        "sampler": sampler.name,
        "rollouts": "teacher" if rollouts is not None else "student",
        "kernel": "fused-linear" if run.loss.fused else "logits",
        "teacher_prefix_tokens": len(run.teacher_prefix) if run.teacher_prefix else 0,
        "consistency_weight": cfg.consistency_weight,
        "consistency_start": cfg.consistency_start,
        "consistency_warmup": cfg.consistency_warmup,
        "anchor_weight": cfg.anchor_weight,
        "context_file": cfg.context,
        "inputs": inputs,
        "before": None if before is None else before.to_dict(),
        "after": None if after is None else after.to_dict(),
    }


def rollouts_fingerprint(cfg: DistillConfig, context, examples, views) -> dict:
    return rollout_store.fingerprint(cfg.teacher or cfg.student, context, examples, [v.teacher_ids for v in views],
                                     cfg.topk, cfg.sampling, cfg.seed)


def make_rollouts(run: Run, ui: UI, out: Path, sampler: Sampler) -> rollout_store.Rollouts:
    """Off-policy: the teacher answers every prompt with the context (through ``sampler``, which serves the
    teacher's weights); saved to ``--rollouts`` (or the run) for reuse."""
    cfg = run.cfg
    prompts = [v.teacher_ids for v in run.views]
    torch.manual_seed(cfg.seed)
    with ui.progress(), autocast(cfg.loading.dtype):
        advance = ui.task("teacher rollouts", len(prompts))
        made = rollout_store.generate(run.teacher, distributed.SplitAcrossRanks(sampler, distributed.world()), prompts, cfg.sampling, cfg.topk,
                                      run.loss.vocab, models.pad_id(run.tokenizer), cfg.batch_size,
                                      rollouts_fingerprint(cfg, run.context, run.examples, run.views), advance)
    if distributed.world().main:
        rollout_store.save(Path(cfg.rollouts) if cfg.rollouts else out / "rollouts", made)
    distributed.barrier()
    return made


def teacher_work(run: Run, ui: UI, out: Path):
    """What a separate teacher (``--teacher``) does before the student's sampler starts: its evaluation with the
    context and, off-policy, its rollouts; with vLLM one engine serves both and is closed after. Returns
    (the teacher's accuracy or None, the rollouts or None)."""
    cfg = run.cfg
    need_eval = cfg.eval_before and cfg.teacher is not None and (bool(run.eval_examples) or evaluates_games(run))
    need_rollouts = cfg.mode == "off-policy" and run.rollouts is None and cfg.teacher is not None and run.games is None
    if not (need_eval or need_rollouts):
        return None, run.rollouts
    engine = run.sampler("teacher", cfg.eval_batch_size) if cfg.sampler == "vllm" else None
    try:
        score = evaluate_teacher(run, ui, engine or run.sampler("teacher", cfg.eval_batch_size)) if need_eval else None
        per_step = cfg.batch_size * cfg.grad_accum
        rollouts = make_rollouts(run, ui, out, engine or run.sampler("teacher", per_step)) if need_rollouts else run.rollouts
    finally:
        if engine is not None:
            engine.close()
    return score, rollouts


def prepare(cfg: DistillConfig, out: RunDir, ui: UI) -> Run:
    """Load and check everything; raises ``OpcdError`` on bad input and writes nothing."""
    if cfg.sampler == "vllm":
        from .sampling.vllm import import_vllm

        import_vllm()  # a missing vLLM is reported before any model is loaded
    check_kernel(cfg.kernel)
    trackers.check_available(cfg.report_to)
    if cfg.env is not None:
        return prepare_games(cfg, out, ui)
    examples, context = load_examples(cfg.data), read_context(cfg.context)
    eval_examples = load_examples(cfg.eval_data, what="eval data") if cfg.eval_data else None
    ood_examples = load_examples(cfg.ood_data, what="OOD data") if cfg.ood_data else None
    for rows, path in ((eval_examples, cfg.eval_data), (ood_examples, cfg.ood_data)):
        if rows is not None:
            require_answers(rows, path)
    if not has_context(examples, context):
        raise OpcdError("nothing to distil: give --context FILE (or -) or rows with a `context` field")
    per_step = cfg.batch_size * cfg.grad_accum
    if per_step > len(examples):
        raise OpcdError(f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} = {per_step} prompts a step is "
                        f"more than the {len(examples)} rows of {cfg.data}: a step would draw a prompt more than once; "
                        f"give at most {len(examples)} prompts a step (or more rows)")
    student, teacher, tokenizer, teacher_name, vocab, student_renderer, teacher_renderer = load_and_render(cfg, ui)
    check_context_lengths(examples, context, cfg.sampling.max_new_tokens, teacher_renderer, teacher,
                          teacher_name)  # before rendering every row around a context that cannot fit
    views = build_views(examples, context, cfg.context_as, student_renderer, teacher_renderer)
    check_windows(examples, views, cfg.sampling.max_new_tokens, student, teacher, cfg.student, teacher_name)
    models.check_token_ids(examples, views, vocab, tokenizer)
    loss = DistillLoss(student, teacher, vocab, cfg.topk, cfg.topk_renorm, cfg.consistency_weight, cfg.kernel,
                       cfg.topk_tail, cfg.anchor_weight, cfg.topk_support == "union")
    saved = None
    if cfg.mode == "off-policy" and cfg.rollouts:
        folder = Path(cfg.rollouts)
        if (folder / rollout_store.META).is_file():
            saved = rollout_store.load(folder, rollouts_fingerprint(cfg, context, examples, views), vocab)
        elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise OpcdError(f"--rollouts {folder} exists and holds no rollouts; give an empty or new folder")
    prefix = teacher_prefix(cfg, views, teacher)
    packer = make_packer(cfg, views, student, teacher, teacher_name, prefix, models.pad_id(tokenizer))
    torch.manual_seed(cfg.seed)
    return Run(cfg, out, examples, views, context, student, teacher, tokenizer, student_renderer, teacher_renderer,
               loss, stop_ids(student, tokenizer), eval_examples, ood_examples, saved,
               sum(p.numel() for p in student.parameters() if p.requires_grad), prefix, packer)


def load_and_render(cfg: DistillConfig, ui: UI):
    """The models and their chat renderers: (student, teacher, tokenizer, teacher name, the shared vocabulary,
    student renderer, teacher renderer)."""
    student, teacher, tokenizer, teacher_tokenizer, teacher_name = load_models(cfg, ui)
    vocab = models.shared_vocab_size(student, teacher, tokenizer, cfg.student, teacher_name)
    if cfg.topk > vocab:
        raise OpcdError(f"topk {cfg.topk} is larger than the vocabulary ({vocab} tokens); choose at most {vocab}")
    load = cfg.loading
    student_renderer = ChatRenderer(tokenizer, cfg.student, load.chat_template_kwargs)
    teacher_renderer = (student_renderer if teacher_tokenizer is tokenizer
                        else ChatRenderer(teacher_tokenizer, teacher_name, load.chat_template_kwargs))
    return student, teacher, tokenizer, teacher_name, vocab, student_renderer, teacher_renderer


def prepare_games(cfg: DistillConfig, out: RunDir, ui: UI) -> Run:
    """``prepare`` for ``--env``: the environment (and the one out of distribution) made and reset once, the
    context read, the models loaded; a probe of the first turn sets the teacher's cached prefix, the window a
    game may fill and the packing. Raises ``OpcdError`` on bad input and writes nothing."""
    from . import envs

    if cfg.rollouts:
        raise OpcdError("--rollouts saves teacher rollouts of dataset rows; games are played anew every step, drop it")
    make_env = envs.environment_factory(cfg.env, cfg.env_options)
    ood = None
    if cfg.ood_env_options is not None:
        ood = (envs.environment_factory(cfg.env, {**cfg.env_options, **cfg.ood_env_options}), read_context(cfg.ood_context))
    context = read_context(cfg.context)
    if not context:
        raise OpcdError("nothing to distil: give --context FILE (or -) for the games")
    probe_env = make_env()  # an environment that fails at once fails here, before anything is written
    observation = envs.reset(probe_env, TRAIN_GAME_SEEDS, cfg.env)
    envs.step(probe_env, PROBE_RESPONSE, cfg.env)
    # the first turn of a game, and a probe whose observation differs from its first character: the teacher's
    # prompts share what comes before the first observation (the cached prefix), and no more
    first = [(("user", observation),), (("user", "!" if observation.startswith("?") else "?"),)]
    student, teacher, tokenizer, teacher_name, vocab, student_renderer, teacher_renderer = load_and_render(cfg, ui)
    examples = [Example(row=TRAIN_GAME_SEEDS, messages=m) for m in first]
    check_context_lengths(examples[:1], context, cfg.sampling.max_new_tokens, teacher_renderer, teacher,
                          teacher_name)
    views = [aligned_views(messages, context, cfg.context_as, student_renderer, teacher_renderer, PROBE_RESPONSE,
                           f"game {TRAIN_GAME_SEEDS}, turn 1") for messages in first]
    check_windows(examples, views, cfg.sampling.max_new_tokens, student, teacher, cfg.student, teacher_name)
    models.check_token_ids(examples, views, vocab, tokenizer)
    windows = [w for w in (models.context_window(student), models.context_window(teacher)) if w is not None]
    extra = len(views[0].teacher_ids) - len(views[0].student_ids)  # what the context adds to every prompt
    window = min([w - max(0, extra) for w in windows]) if windows else None
    loss = DistillLoss(student, teacher, vocab, cfg.topk, cfg.topk_renorm, cfg.consistency_weight, cfg.kernel,
                       cfg.topk_tail, cfg.anchor_weight, cfg.topk_support == "union")
    prefix = teacher_prefix(cfg, views, teacher)
    packer = make_packer(cfg, views, student, teacher, teacher_name, prefix, models.pad_id(tokenizer))
    torch.manual_seed(cfg.seed)
    return Run(cfg, out, [], views, context, student, teacher, tokenizer, student_renderer, teacher_renderer, loss,
               stop_ids(student, tokenizer), None, None, None,
               sum(p.numel() for p in student.parameters() if p.requires_grad), prefix, packer,
               GameSetup(cfg.env, make_env, cfg.max_turns, window, ood))


MIN_PREFIX_TOKENS = 16  # a shorter shared start is not worth a cache


def teacher_prefix(cfg: DistillConfig, views: list[Views], teacher) -> TeacherPrefix | None:
    """On-policy, the start every teacher prompt shares (the rendered context when one serves every row), for
    the teacher to read once per run; None when the rows' contexts differ, the teacher's attention has sliding
    windows, or ``--no-teacher-prefix-cache``."""
    if not cfg.teacher_prefix_cache or cfg.mode != "on-policy" or not can_reuse_prefix(teacher):
        return None
    ids = common_prefix([v.teacher_ids for v in views])
    return TeacherPrefix(ids) if len(ids) >= MIN_PREFIX_TOKENS else None


def check_kernel(kernel: str) -> None:
    """The loss implementation asked for (``--kernel``, or ``OPCD_KERNEL`` for ``auto``) can run here."""
    import os

    from .kernels import backend_for

    try:
        backend = backend_for(torch.zeros((), device=models.device()), kernel)
    except (ValueError, RuntimeError) as e:
        raise OpcdError(f"{e}; use --kernel torch") from None
    if backend == "triton" and models.device().type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise OpcdError("the triton kernels need a GPU, or Triton's interpreter on a CPU: set TRITON_INTERPRET=1 "
                        "before starting opcd, or use --kernel torch")


def load_models(cfg: DistillConfig, ui: UI):
    """(student, teacher, student tokenizer, teacher tokenizer, teacher name): the student in float32 master
    weights, the teacher frozen in the compute dtype (a copy of the student's initial weights by default)."""
    load = cfg.loading
    with ui.status(f"loading student {cfg.student}"):
        tokenizer = models.load_tokenizer(cfg.student, load.trust_remote_code)
        if cfg.lora_rank is None:
            student = models.load_model(cfg.student, "float32", load.trust_remote_code, load.allow_bin_weights)
        else:  # a frozen base in the compute dtype; PEFT keeps the adapters in float32
            torch.manual_seed(cfg.seed)  # the adapters' random initialisation is the run's own
            student = lora.add_adapters(models.frozen(models.load_model(cfg.student, load.dtype, load.trust_remote_code,
                                                                        load.allow_bin_weights)),
                                        cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if cfg.teacher_kind == "live":  # self-distillation: the student itself reads the context
        return student, student, tokenizer, tokenizer, cfg.student
    if cfg.teacher_kind == "ema":  # starts at the student's initial weights, follows it (float32, as the student)
        return student, models.frozen(models.frozen_copy(student)), tokenizer, tokenizer, cfg.student
    if cfg.teacher is None:  # the paper's default: the student's initial weights
        if lora.is_lora(student):
            return student, lora.AdaptersOff(student), tokenizer, tokenizer, cfg.student  # free: no second copy
        teacher = models.frozen(models.frozen_copy(student).to(models.resolve_dtype(load.dtype)))
        return student, teacher, tokenizer, tokenizer, cfg.student
    with ui.status(f"loading teacher {cfg.teacher}"):
        teacher_tokenizer = models.load_tokenizer(cfg.teacher, load.trust_remote_code)
        models.check_same_vocabulary(tokenizer, teacher_tokenizer, cfg.student, cfg.teacher)
        teacher = models.frozen(models.load_model(cfg.teacher, load.dtype, load.trust_remote_code,
                                                  load.allow_bin_weights))
    return student, teacher, tokenizer, teacher_tokenizer, cfg.teacher


def check_context_lengths(examples, context, max_new_tokens, renderer: ChatRenderer, teacher, teacher_name) -> None:
    """A context longer than the teacher's window (with room for a response) is an error at once: each distinct
    context is tokenized once, before any row is rendered around it."""
    window = models.context_window(teacher)
    if window is None:
        return
    contexts = {e.context or context: e.row for e in examples}
    for text, row in contexts.items():
        if text is None:
            continue
        tokens = len(renderer.controls.as_text(text))  # as the prompts will hold it
        if tokens + max_new_tokens > window:
            where = f"the context of row {row}" if text != context else "the context"
            raise OpcdError(f"{where} is {tokens} tokens; with {max_new_tokens} new tokens it exceeds {teacher_name}'s "
                            f"window of {window}; shorten it or lower --max-new-tokens (contexts are never truncated)")


def check_windows(examples, views, max_new_tokens, student, teacher, student_name, teacher_name) -> None:
    """Contexts are never truncated: a prompt that cannot fit with its response is an error naming the row."""
    for model, name, pick in ((student, student_name, "student_ids"), (teacher, teacher_name, "teacher_ids")):
        window = models.context_window(model)
        if window is None:
            continue
        for example, view in zip(examples, views):
            need = len(getattr(view, pick)) + max_new_tokens
            if need > window:
                raise OpcdError(
                    f"row {example.row}: the {'teacher' if pick == 'teacher_ids' else 'student'} prompt is "
                    f"{len(getattr(view, pick))} tokens, plus {max_new_tokens} new tokens exceeds {name}'s window of "
                    f"{window}; shorten the context or lower --max-new-tokens (contexts are never truncated)"
                )


def greedy(cfg: DistillConfig) -> SamplingOptions:
    return SamplingOptions(temperature=0.0, max_new_tokens=cfg.eval_max_new_tokens or cfg.sampling.max_new_tokens)


def evaluates_games(run: Run) -> bool:
    return run.games is not None and run.cfg.eval_games > 0


def play_eval_games(run: Run, sampler: Sampler, renderer: ChatRenderer, ui: UI, title: str, context: str | None,
                    ood: bool) -> GameEvalResult:
    """Greedy games on the evaluation seeds: without the context, with it when given, and out of distribution."""
    cfg, setup = run.cfg, run.games
    ood_setup = setup.ood if ood else None
    with ui.progress(), autocast(cfg.loading.dtype):
        torch.manual_seed(cfg.seed)
        advance = ui.task(title, plays(cfg.eval_games, setup.max_turns, context is not None, ood_setup is not None))
        return evaluate_games(distributed.SplitAcrossRanks(sampler, distributed.world()), renderer, setup.make_env,
                              setup.name, list(range(cfg.eval_games)), context=context, context_as=cfg.context_as,
                              sampling=greedy(cfg), max_turns=setup.max_turns, window=setup.window, advance=advance,
                              ood=ood_setup)


def evaluate_teacher(run: Run, ui: UI, sampler: Sampler) -> float:
    """The teacher's greedy accuracy on the eval split with the context (a teacher other than the student); with
    ``--env``, its success in the evaluation games."""
    cfg = run.cfg
    if run.games is not None:
        games = play(distributed.SplitAcrossRanks(sampler, distributed.world()), run.teacher_renderer,
                     run.games.make_env, run.games.name, list(range(cfg.eval_games)), context=run.context,
                     context_as=cfg.context_as, sampling=greedy(cfg), max_turns=run.games.max_turns,
                     window=run.games.window)
        return GameScores.of(games).success
    with ui.progress(), autocast(cfg.loading.dtype):
        torch.manual_seed(cfg.seed)
        advance = ui.task("eval before: teacher with context", len(run.eval_examples))
        return score(distributed.SplitAcrossRanks(sampler, distributed.world()), run.teacher_renderer, run.eval_examples, context=run.context, context_as=cfg.context_as,
                     sampling=greedy(cfg), verifier=cfg.verifier, advance=advance).accuracy


def evaluate_student(run: Run, sampler: Sampler, ui: UI, when: str, teacher_score: float | None = None):
    """The student's greedy ``EvalResult`` on the eval split (without and with the context) and the OOD split.

    Before training, the teacher's accuracy with the context goes in too: measured for a separate teacher,
    and for the default teacher (the student's frozen initial weights) the student's own with the context.
    """
    cfg = run.cfg
    if not run.eval_examples and not evaluates_games(run):
        return None
    was_training = run.student.training
    run.student.eval()
    try:
        if run.games is not None:
            result = play_eval_games(run, sampler, run.student_renderer, ui, f"eval {when}", run.context, True)
        else:
            with ui.progress(), autocast(cfg.loading.dtype):
                torch.manual_seed(cfg.seed)
                advance = ui.task(f"eval {when}", passes(run.eval_examples, run.context, run.ood_examples))
                result = evaluate_model(sampler, run.student_renderer, run.eval_examples, context=run.context,
                                        context_as=cfg.context_as, sampling=greedy(cfg), verifier=cfg.verifier,
                                        ood=run.ood_examples, advance=advance)
    finally:
        run.student.train(was_training)
    if when == "before":  # games: the same two fields under their games names
        games = run.games is not None
        own = result.success_with_context if games else result.accuracy_with_context
        teacher = teacher_score if cfg.teacher is not None else own
        result = replace(result, **{"teacher_success_with_context" if games else "teacher_accuracy_with_context": teacher})
    return result


def finished(response: list[int], stop: set[int]) -> bool:
    return bool(response) and response[-1] in stop


def lr_lambda(cfg: DistillConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.lr_schedule == "linear":
            return 1 - progress
        return 1.0

    return factor


def autocast(dtype_name: str):
    """Mixed precision around forward passes when the compute dtype is not float32 (master weights stay float32)."""
    dtype = models.resolve_dtype(dtype_name)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(models.device().type, dtype=dtype)
