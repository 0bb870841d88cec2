"""What a run tells: the prompts each model reads, a line of ``metrics.jsonl`` a step, and the summary with the
time by phase."""

from __future__ import annotations

import time

import torch

from .. import distributed
from ..config import DistillConfig
from ..evaluate import EvalResult
from ..games import TRAIN_GAME_SEEDS
from ..timing import PHASES
from ..ui import UI
from .records import Run, Training


def show_prompts(run: Run, ui: UI) -> None:
    """What each model reads: the rendered teacher and student prompts of the first ``--show-prompts`` rows."""
    shown = ([(f"game {TRAIN_GAME_SEEDS}, turn 1", None, run.views[0])] if run.cfg.plays_games
             else [(f"row {e.row}", e.context, v) for e, v in zip(run.examples, run.views)])
    for where, context, views in shown[: run.cfg.output.show_prompts]:
        teacher_text = run.teacher_renderer.show(views.teacher_ids)
        student_text = run.student_renderer.show(views.student_ids)
        as_text = "; ‹ › marks a control token's string that is plain text here" if "‹" in teacher_text + student_text else ""
        ui.prompt(f"{where}, teacher ({len(views.teacher_ids)} tokens; the context between ⟦ ⟧{as_text})",
                  teacher_text, mark=run.teacher_renderer.controls.mark_text(context or run.context or "") or None)
        ui.prompt(f"{where}, student ({len(views.student_ids)} tokens{as_text})", student_text)


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


def teacher_description(cfg: DistillConfig) -> str:
    """What the teacher is, in words (the summary's ``teacher``)."""
    if cfg.teacher_kind == "live":
        return f"{cfg.student} itself, as it trains (live)"
    if cfg.teacher_kind == "ema":
        return f"moving average of {cfg.student} (decay {cfg.ema_decay})"
    return cfg.teacher or (f"{cfg.student} with the adapters off" if cfg.lora.lora_rank else f"frozen copy of {cfg.student}")


def build_summary(run: Run, training: Training, after: EvalResult | None, *, inputs: dict, sampler_name: str,
                  rollouts, started: float, train_seconds: float, peak_memory: list[float]) -> dict:
    """``summary.json``: what ran, how long, and the evaluations before and after."""
    cfg, last = run.cfg, training.metrics[-1] if training.metrics else {}
    return {
        "output_dir": str(run.out.final),
        "mode": cfg.mode,
        **({"env": cfg.games.env, "max_turns": cfg.games.max_turns} if cfg.plays_games else {}),
        "student": cfg.student,
        "teacher": teacher_description(cfg),
        "teacher_kind": cfg.teacher_kind,
        "ema_decay": cfg.ema_decay if cfg.teacher_kind == "ema" else None,
        "trainable_parameters": run.trainable_parameters,
        "lora": None if cfg.lora.lora_rank is None else {"rank": cfg.lora.lora_rank, "alpha": cfg.lora.alpha,
                                                    "targets": cfg.lora.lora_targets, "merged": cfg.lora.merge},
        "steps": cfg.optim.steps,
        "seconds": round(time.time() - started, 1),
        "train_seconds": round(train_seconds, 1),
        "world_size": distributed.world().size,
        "peak_memory_gib_by_rank": [round(gib, 3) for gib in peak_memory],
        "final_loss": last.get("loss"),
        "final_topk_mass": last.get("topk_mass"),
        "objective": cfg.loss.objective if cfg.on_policy else None,
        "jsd_beta": cfg.loss.jsd_beta if cfg.loss.objective == "jsd" else None,
        "samples_per_prompt": cfg.optim.samples_per_prompt,
        "reward_weight": cfg.loss.reward_weight,
        "final_reward": last.get("reward"),
        "topk_tail": cfg.loss.topk_tail,
        "topk_support": cfg.loss.topk_support,
        "min_topk_mass": cfg.loss.min_topk_mass,
        "topk_mass_escape": None if training.escape is None else training.escape.to_dict(),
        "time_by_phase": time_by_phase(training.metrics),
        "sampler": sampler_name,
        "rollouts": "teacher" if rollouts is not None else "student",
        "kernel": "fused-linear" if run.loss.fused else "logits",
        "teacher_prefix_tokens": len(run.teacher_prefix) if run.teacher_prefix else 0,
        "consistency_weight": cfg.loss.consistency_weight,
        "consistency_start": cfg.loss.consistency_start,
        "consistency_warmup": cfg.loss.consistency_warmup,
        "anchor_weight": cfg.loss.anchor_weight,
        "anchor_start": cfg.loss.anchor_start,
        "anchor_warmup": cfg.loss.anchor_warmup,
        "user_prefix_consistency": cfg.context_as == "user-prefix" and cfg.loss.user_prefix_consistency,
        "context_file": cfg.context,
        "inputs": inputs,
        "before": None if training.before is None else training.before.to_dict(),
        "after": None if after is None else after.to_dict(),
    }
