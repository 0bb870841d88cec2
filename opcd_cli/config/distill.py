"""``opcd distill``'s configuration: what to distil at the top, the settings in groups (each checking its own
fields), and the rules that join groups checked here, in one place."""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import OpcdError
from .checks import check_seed, check_types, choice
from .names import route
from .options import (CONTEXT_AS, DISTILL_MODES, TEACHER_KINDS, USER_PREFIX_CONSISTENCY_WEIGHT, EngineOptions, EvalOptions, FieldOptions, GameOptions,
                      LoraOptions, LossOptions, ModelOptions, OptimOptions, OutputOptions, SamplingOptions)

FLAT_GROUPS = ("fields", "games", "loss", "optim", "evaluation", "output", "engine", "lora")  # groups whose settings are
# written flat, as flags and recipe keys (``--topk``, ``topk = 4``); ``sampling`` and ``loading`` are tables too


@dataclass(frozen=True, init=False)
class DistillConfig:
    """``opcd distill``'s settings. Made from flat settings as flags and recipes name them
    (``DistillConfig(student="toy:small", topk=4)``) or from whole groups (``loss=LossOptions(topk=4)``)."""

    # what to distil
    name: str | None = None  # names the default output directory (default: the student's)
    student: str | None = None  # an id, a folder, or a built-in name (toy:small)
    teacher: str | None = None  # None: a frozen copy of the student's initial weights
    teacher_kind: str = "frozen"  # frozen, ema (a moving average of the student) or live (the student itself)
    ema_decay: float = 0.99  # teacher_kind ema: teacher <- decay * teacher + (1 - decay) * student, every step
    data: str | None = None
    context: str | None = None  # a file, "-" for stdin, or a built-in text; rows may carry their own `context`
    context_as: str = "system"
    mode: str = "on-policy"  # off-policy: the paper's baseline, training on the teacher's own responses
    rollouts: str | None = None  # off-policy: a folder of saved teacher rollouts to reuse (written if missing)
    seed: int = 0
    # the settings, in groups
    fields: FieldOptions = field(default_factory=FieldOptions)  # which columns are the prompt, the answer, ...
    games: GameOptions = field(default_factory=GameOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    loading: ModelOptions = field(default_factory=ModelOptions)

    def __init__(self, **settings: Any):
        given = route(DistillConfig, settings)
        for f in fields(self):
            object.__setattr__(self, f.name, given[f.name] if f.name in given else f.default)
        self.__post_init__()

    def __post_init__(self):
        check_types(self)
        check_seed(self.seed)
        choice("context_as", self.context_as, CONTEXT_AS)
        choice("mode", self.mode, DISTILL_MODES)
        choice("teacher_kind", self.teacher_kind, TEACHER_KINDS)
        if isinstance(self.ema_decay, bool) or not 0 < self.ema_decay < 1:
            raise OpcdError(f"ema_decay must be in (0, 1) (0.99: the teacher takes 1% of each step); got {self.ema_decay!r}")
        _check_sources(self)
        _check_on_policy_only(self)
        _check_teacher_kind(self)
        _check_reward(self)
        _check_dependent(self)
        _user_prefix_consistency(self)
        if self.output.save_every > self.optim.steps:
            steps = self.optim.steps
            raise OpcdError(f"save_every {self.output.save_every} is more than the {steps} steps, so no checkpoint "
                            f"would be kept; use at most {steps} (or 0 for the final model only)")
        if self.sampling.n != 1:
            raise OpcdError("on-policy distillation samples one response per prompt; set n = 1 (raise batch_size instead)")

    @property
    def per_step(self) -> int:
        """Prompts (or games) a step: ``batch_size`` x ``grad_accum``, over every process."""
        return self.optim.per_step

    @property
    def on_policy(self) -> bool:
        """Whether the student trains on its own responses (the paper's method), not the teacher's."""
        return self.mode == "on-policy"

    @property
    def plays_games(self) -> bool:
        """Whether the run plays games (``--env``) instead of reading rows."""
        return self.games.env is not None

    def inputs(self) -> dict[str, str | None]:
        """What the run reads, by flag: an output may be none of them, hold none and lie in none."""
        return {"--student": self.student, "--teacher": self.teacher, "--data": self.data, "--context": self.context,
                "--eval-data": self.evaluation.eval_data, "--ood-data": self.evaluation.ood_data,
                "--ood-context": self.games.ood_context, "--rollouts": self.rollouts}

    def default_output_dir(self) -> str:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = self.name or Path(str(self.student).replace(":", "-")).name
        return str(Path("runs") / f"{name}-{stamp}")

    def with_settings(self, **flat: Any) -> "DistillConfig":
        """This configuration with some settings changed, named as flags and recipe keys name them
        (``output_dir``, ``batch_size``), checked again."""
        return dataclasses.replace(self, **flat)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a recipe holds them (``opcd_config.json``): flat, with ``sampling`` and ``loading``
        as tables, the same form as before the settings were grouped."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in FLAT_GROUPS:
                flat.update(dataclasses.asdict(value))
            else:
                flat[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return flat


def _check_sources(cfg: DistillConfig) -> None:
    """Rows or games, with a student; games score games, not rows."""
    if cfg.student is None and cfg.data is not None:
        raise OpcdError("--data needs --student: give the model to train (or drop --data to run the toy world)")
    if cfg.student is not None and cfg.data is None and not cfg.plays_games:
        raise OpcdError("--student needs --data: give the prompts to train on (JSONL, JSON, CSV, Parquet or a saved "
                        "dataset), or --env: a game to play")
    if cfg.plays_games:
        if cfg.data is not None:
            raise OpcdError("give --data (prompts) or --env (a game to play), not both")
        if cfg.evaluation.eval_data is not None or cfg.evaluation.ood_data is not None:
            raise OpcdError("with --env the evaluation plays games: use --eval-games and --ood-env-options, "
                            "not --eval-data or --ood-data")
    cfg.fields.check_splits({"split": {"--data": cfg.data},
                             "eval_split": {"--eval-data": cfg.evaluation.eval_data, "--ood-data": cfg.evaluation.ood_data}})


def _check_on_policy_only(cfg: DistillConfig) -> None:
    """What shapes the on-policy loss, refused off-policy (where the teacher's saved top-k is the support)."""
    loss = cfg.loss
    if cfg.on_policy:
        if loss.stop_on_escape and loss.min_topk_mass == 0:
            raise OpcdError("--stop-on-escape watches the student's own top-k mass on-policy; it needs --mode on-policy "
                            "and a --min-topk-mass above 0")
        return
    if loss.objective != "topk-reverse-kl":
        raise OpcdError(f"--objective {loss.objective} is an on-policy objective; off-policy the loss is "
                        "--off-policy-loss (forward-kl or sft): drop --objective or use --mode on-policy")
    if loss.reward_weight > 0:
        raise OpcdError("--reward-weight rewards the student's own samples; off-policy the responses are the teacher's: "
                        "drop it or use --mode on-policy")
    if cfg.optim.samples_per_prompt != 1:
        raise OpcdError("--samples-per-prompt samples the student several times per prompt; off-policy the responses "
                        "are the teacher's: drop it or use --mode on-policy")
    if loss.consistency_weight > 0:
        raise OpcdError("the consistency regulariser needs on-policy rollouts; drop --consistency-weight or use --mode on-policy")
    if loss.anchor_weight > 0:
        raise OpcdError("the in-context anchor scores the student's own rollouts; drop --anchor-weight or use --mode on-policy")
    if loss.topk_tail:
        raise OpcdError("--topk-tail shapes the on-policy loss over the student's top-k; drop it with --mode off-policy")
    if cfg.teacher_kind != "frozen":
        raise OpcdError(f"--teacher-kind {cfg.teacher_kind} moves the teacher during on-policy training; "
                        "off-policy the teacher's rollouts are made once: drop it with --mode off-policy")
    if loss.topk_support != "student":
        raise OpcdError("--topk-support chooses the on-policy loss's support; off-policy the support is the "
                        "teacher's saved top-k: drop it with --mode off-policy")
    if loss.stop_on_escape:
        raise OpcdError("--stop-on-escape watches the student's own top-k mass on-policy; it needs --mode on-policy "
                        "and a --min-topk-mass above 0")


def _check_teacher_kind(cfg: DistillConfig) -> None:
    if cfg.teacher_kind == "frozen":
        return
    if cfg.teacher is not None:
        raise OpcdError(f"--teacher-kind {cfg.teacher_kind} makes the teacher from the student; drop --teacher")
    if cfg.teacher_kind == "ema" and cfg.lora.lora_rank is not None:
        raise OpcdError("--teacher-kind ema averages the student's full weights; with --lora-rank use "
                        "--teacher-kind live or frozen")


def _user_prefix_consistency(cfg: DistillConfig) -> None:
    """With the context in the user's turn, on-policy, the context-removability regulariser is on from the second
    half of the steps at ``USER_PREFIX_CONSISTENCY_WEIGHT``, unless the regulariser or the anchor is asked for or
    ``user_prefix_consistency`` is false. Distilling a context placed there teaches the student to answer wrongly
    when the context is shown again (on the toy's `codes`, a context harm of 15% to 69.5%); the regulariser, held
    back until the student has learned, removes that at no cost to learning (bench/placement_study.py). Set once:
    the run's settings keep it."""
    loss = cfg.loss
    asked = (loss.consistency_weight > 0 or loss.consistency_start != 1 or loss.consistency_warmup or
             loss.anchor_weight > 0 or loss.anchor_start != 1 or loss.anchor_warmup)
    if cfg.context_as != "user-prefix" or not cfg.on_policy or cfg.plays_games or not loss.user_prefix_consistency or asked:
        return
    object.__setattr__(cfg, "loss", dataclasses.replace(loss, consistency_weight=USER_PREFIX_CONSISTENCY_WEIGHT,
                                                        consistency_start=cfg.optim.steps // 2 + 1))


def _check_reward(cfg: DistillConfig) -> None:
    """The reward term's advantage is a group's: several samples of each prompt (on-policy, checked above)."""
    if cfg.loss.reward_weight > 0 and cfg.on_policy and cfg.optim.samples_per_prompt < 2:
        raise OpcdError("--reward-weight takes each reward less its group's mean, which needs several samples of each "
                        "prompt; give --samples-per-prompt 2 or more (4 to 8 is usual)")


def flat_settings(cfg) -> dict[str, Any]:
    """Every setting of a configuration by its flat name (the groups' and the tables' fields included)."""
    flat: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        flat.update(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return flat


def flat_defaults(cls) -> dict[str, Any]:
    """Every setting's default by its flat name."""
    flat: dict[str, Any] = {}
    for f in fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            flat.update(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {f.name: value})
        else:
            flat[f.name] = f.default
    return flat


def _check_dependent(cfg: DistillConfig) -> None:
    """Settings that only act with another one are refused without it, instead of being ignored."""
    rules = [(("ema_decay",), cfg.teacher_kind == "ema", "--teacher-kind ema (the moving average it sets)"),
             (("vllm_memory", "vllm_eager"), cfg.engine.sampler == "vllm", "--sampler vllm"),
             (("env_options", "max_turns", "eval_games"), cfg.plays_games, "--env (the game they set up)"),
             (("off_policy_loss", "rollouts"), not cfg.on_policy, "--mode off-policy"),
             (("user_prefix_consistency",), cfg.context_as == "user-prefix", "--context-as user-prefix")]
    values, defaults = flat_settings(cfg), flat_defaults(DistillConfig)
    for names, present, needed in rules:
        given = [name for name in names if values[name] != defaults[name]]
        if given and not present:
            flag = ("--no-" if values[given[0]] is False else "--") + given[0].replace("_", "-")  # as it was typed
            raise OpcdError(f"{flag} only acts with {needed}; give that too, or drop {flag}")
