"""A distillation run from start to end, read top to bottom: open the output, prepare, the teacher's work,
the evaluation before, the loop, the final model, the evaluation after, the summary."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import time
from pathlib import Path

import torch

from .. import distributed, lora, models, trackers
from ..config import DistillConfig
from ..errors import DiskFull, Interrupted, OpcdError
from ..escape import EscapeGuard
from ..outputs import RUN_MARKER, FollowerRunDir, RunDir, write_json_atomic
from ..plots import plot_runs
from ..timing import StepTimer
from ..ui import UI
from .evals import evaluate_student
from .records import Run, Training
from .report import build_summary, peak_memory_gib, show_prompts
from .samplers import Samplers, open_samplers
from .setup import check_world, prepare
from .signals import Terminated, stop_signals, terminate_as_interrupt
from .state import (
    check_resumable,
    check_resume,
    restore,
    save_student,
    save_training_state,
    saved_state_exists,
    write_inputs,
)
from .step import new_training, take_step
from .teacher_work import make_rollouts, saved_rollouts, teacher_work


def distill(cfg: DistillConfig, ui: UI, resume: bool = False) -> dict:
    """Run context distillation and return the summary (also written to ``summary.json``). With ``resume``,
    continue the run at ``cfg.output.output_dir`` (its ``.partial`` folder, or a finished run) from its saved state."""
    started = time.time()
    if cfg.student is None:
        raise OpcdError("give --student (or no model arguments at all, to run the built-in toy world)")
    with terminate_as_interrupt(), distributed.session() as world:
        distributed.agree(lambda: check_world(cfg, world))  # before anything loads; every rank says it
        out = distributed.agree(lambda: open_output(cfg, resume, world))  # checked and locked by rank 0
        final = distributed.broadcast_object(str(out.final) if out else None)
        out = out or FollowerRunDir(final)
        try:
            run = distributed.agree(lambda: prepare(cfg.with_settings(output_dir=str(out.final)), out, ui))
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


def open_output(cfg: DistillConfig, resume: bool, world: distributed.World) -> RunDir | None:
    """Rank 0 checks and locks the output directory (and, to resume, its saved state); the other ranks write
    through rank 0 only, and get None."""
    if not world.main:
        return None
    out = RunDir(cfg.output.output_dir or cfg.default_output_dir(), cfg.output.overwrite, resume=resume,
                 inputs=cfg.inputs())
    if resume:
        try:
            check_resumable(out, cfg.optim.steps)
        except OpcdError:
            out.release()
            raise
    return out


def distribute(run: Run, world: distributed.World) -> Run:
    """The prepared run ready for its world: activations recomputed in the backward pass with
    ``--gradient-checkpointing``; with several processes, the student sharded with FSDP2 (and the teacher too
    with ``--teacher-sharding shard``), and each rank sampling from its own random stream."""
    cfg = run.cfg
    if cfg.engine.gradient_checkpointing:
        run.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not world.active:
        return run
    dtype = models.resolve_dtype(cfg.loading.dtype)
    distributed.shard(run.student, dtype)
    teacher_is_student = run.teacher is run.student or isinstance(run.teacher, lora.AdaptersOff)  # its shards
    if not teacher_is_student and (cfg.engine.teacher_sharding == "shard" or cfg.teacher_kind == "ema"):  # an average:
        distributed.shard(run.teacher, dtype)  # sharded as the student is
    torch.manual_seed(cfg.seed + 1_000_003 * world.rank)  # rank 0's stream is the single process's
    return run


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
    teacher_score, rollouts = (None, saved_rollouts(run, out)) if resume else teacher_work(run, ui, out)
    samplers = Samplers()
    try:
        samplers = open_samplers(run, "student", rollouts)
        if samplers.rollouts is not None:  # off-policy rows, the default teacher: its rollouts, written now
            rollouts = make_rollouts(run, ui, out, samplers.rollouts)
        training = new_training(run)
        if resume:
            restore(run, training, samplers.training, out)
        elif cfg.evaluation.eval_before:
            training.before = evaluate_student(run, samplers.evaluation, ui, "before", teacher_score)
        train_seconds = loop(run, training, samplers, rollouts, out, ui)
        student.eval()
        stopped = training.escape is not None and training.escape.stopped
        if cfg.output.save_every and not stopped:  # a run that keeps checkpoints can be continued with more --steps
            save_training_state(run, training, samplers.training, out)
        save_student(run, out, final=True)  # a LoRA student is merged in place here, unless --no-merge
        if not cfg.on_policy or run.student is not student:
            samplers.follow(run.student)  # off-policy, the evaluation sampler has not followed training
        after = evaluate_student(run, samplers.evaluation, ui, "after")
    finally:
        samplers.close()
    summary = build_summary(run, training, after, inputs=inputs, sampler_name=samplers.training.name, rollouts=rollouts,
                            started=started, train_seconds=train_seconds,
                            peak_memory=distributed.gather_objects(peak_memory_gib()))
    distributed.barrier()  # every rank has finished before the run is put in place
    if main:
        write_json_atomic(out / "summary.json", summary)
        plot_runs([(run.out.final.name, training.metrics)], out / "metrics.png",
                  title=f"opcd distill: {run.out.final.name}")
        run.out.finish()
    return summary


def loop(run: Run, training: Training, samplers: Samplers, rollouts, out: Path, ui: UI) -> float:
    """The steps from ``training.step + 1`` to ``--steps``; returns the seconds they took. SIGINT and SIGTERM
    stop it after the current step, with the state saved."""
    cfg, student, world = run.cfg, run.student, distributed.world()
    train_start = time.time()
    student.train()
    tracker = trackers.open_tracker(cfg.output.report_to if world.main else "none", out, run.out.final.name,
                                    cfg.to_dict())
    timer = StepTimer(models.device())  # one host synchronisation a step, at its end
    watched = cfg.on_policy and cfg.loss.watches_topk_mass  # the student's own top-k mass, which the guard reads
    guard = EscapeGuard(cfg.loss.min_topk_mass if watched else 0.0, cfg.loss.stop_on_escape, student.parameters())
    # the signals are the loop's before metrics.jsonl exists: a signal once it does stops after a step
    with stop_signals() as stop, ui.progress(), metrics_log(out, world) as log, contextlib.closing(tracker):
        advance = ui.task(f"distill ({cfg.mode})", cfg.optim.steps)
        advance(training.step)
        for step in range(training.step + 1, cfg.optim.steps + 1):
            record = take_step(run, training, samplers, rollouts, step, guard, timer, ui, train_start)
            # 5. log and checkpoint
            training.step = step
            training.metrics.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            tracker.log(step, record)
            escaped = " [yellow](below --min-topk-mass)[/]" if training.escape is not None else ""
            mass = "" if record["topk_mass"] is None else f" top-k mass {record['topk_mass']:.3f}"
            advance(1, status=f"loss {record['loss']:.4f}{mass}{escaped}")
            if training.escape is not None and training.escape.stopped:  # the last good weights back, this step
                training.optimizer.zero_grad(set_to_none=True)  # not applied
                guard.restore()
                samplers.training.update_weights(student)
                break
            if cfg.output.save_every and step % cfg.output.save_every == 0 and step < cfg.optim.steps:
                save_student(run, out / "checkpoints" / f"step-{step:06d}")
                save_training_state(run, training, samplers.training, out)
            if distributed.any_rank(stop.signal is not None, models.device()):  # every rank stops after the same step
                stop.signal = stop.signal or signal.SIGTERM
                save_training_state(run, training, samplers.training, out)
                raise Interrupted(f"stopped after step {step} of {cfg.optim.steps} ({stop.signal.name}); continue "
                                  f"with: "
                                  f"opcd distill --resume {run.out.partial}", code=128 + stop.signal.value)
    return time.time() - train_start


def metrics_log(out: Path, world):
    """``metrics.jsonl``, opened to append (rank 0); the other ranks write their lines nowhere."""
    return (out / "metrics.jsonl").open("a") if world.main else contextlib.nullcontext(io.StringIO())
