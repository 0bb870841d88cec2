"""Frozen run configurations, built from defaults, recipes and command-line flags, validated here.

This is the one place where bad values become clear errors, and where the accepted names of every choice
live (``DTYPES``, ``VERIFIERS``, ``SAMPLERS``, ``KERNELS``, ...). Layers, later ones winning: dataclass
defaults < the built-in toy recipe (when no model is given anywhere) < ``--recipe`` < flags. A recipe is a
TOML file or the name of a packaged one (``toy-codes``; see ``sources.py``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import OpcdError
from .verifiers import VERIFIERS as VERIFIER_FUNCTIONS

CONTEXT_AS = ("system", "user-prefix")
DTYPES = ("auto", "float32", "bfloat16", "float16")
VERIFIERS = ("auto", *VERIFIER_FUNCTIONS)  # auto: the row's own `verifier`, else exact
SAMPLERS = ("hf", "vllm")
KERNELS = ("auto", "torch", "triton")
TOPK_SUPPORTS = ("student", "union")  # the KL's support: the student's top-k ids, or those and the teacher's
TEACHER_KINDS = ("frozen", "ema", "live")  # what the teacher is during training (teachers.py)
SCHEDULES = ("constant", "cosine", "linear")
REPORT_TO = ("none", "tensorboard", "wandb")
TEACHER_SHARDING = ("replicate", "shard")  # several processes: a whole teacher on each rank, or sharded
DISTILL_MODES = ("on-policy", "off-policy")
OFF_POLICY_LOSSES = ("forward-kl", "sft")


# --- the type of every value -----------------------------------------------------------------------------
# Recipes are TOML written by hand, so a value can have the wrong type and still look right: the string
# "false" is truthy. Every value must have the type its field declares; nothing is converted.

_DESCRIBE = {bool: "true or false (a boolean, not a string or a number)", int: "a whole number",
             float: "a finite number", str: "a string", dict: "a table", tuple: "a list"}


@lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(hint) -> tuple[tuple, bool]:
    """(accepted base types, whether None is allowed) of a field's type hint."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        bases = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
        return bases, type(None) in args
    return (typing.get_origin(hint) or hint,), False


def check_value(name: str, value: Any, hint, where: str = "") -> None:
    """An ``OpcdError`` naming the setting, the value and the expected type when ``value`` does not fit ``hint``."""
    bases, optional = _allowed(hint)
    if value is None and optional:
        return
    for base in bases:
        if dataclasses.is_dataclass(base):
            if isinstance(value, base):
                return
        elif base is bool:
            if isinstance(value, bool):
                return
        elif base is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return
        elif base is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return
        elif isinstance(value, base):
            return
    expected = " or ".join(_DESCRIBE.get(b, getattr(b, "__name__", str(b))) for b in bases)
    raise OpcdError(f"{where}{name} must be {expected}; got {value!r}")


def _check_types(obj) -> None:
    for f in fields(obj):
        check_value(f.name, getattr(obj, f.name), _hints(type(obj))[f.name])


@dataclass(frozen=True)
class ModelOptions:
    """How models are loaded (shared by every command)."""

    dtype: str = "auto"
    trust_remote_code: bool = False  # run a model's own Python code (config.json's auto_map)
    allow_bin_weights: bool = False  # load pickled *.bin weights (through PyTorch's weights-only unpickler)
    chat_template_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_types(self)
        _choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.chat_template_kwargs, dict):
            raise OpcdError("chat_template_kwargs must be a table of keyword arguments, e.g. {enable_thinking = false}")


@dataclass(frozen=True)
class SamplingOptions:
    """How responses are generated. ``temperature`` 0 means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    n: int = 1

    def __post_init__(self):
        _check_types(self)
        _at_least("temperature", self.temperature, 0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise OpcdError(f"top_p must be in (0, 1]; got {self.top_p}")
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        _at_least("n", self.n, 1)


@dataclass(frozen=True)
class DistillConfig:
    # what to distil
    name: str | None = None  # names the default output directory (default: the student's)
    student: str | None = None  # an id, a folder, or a built-in name (toy:small)
    teacher: str | None = None  # None: a frozen copy of the student's initial weights
    data: str | None = None
    context: str | None = None  # a file, "-" for stdin, or a built-in text; rows may carry their own `context`
    context_as: str = "system"
    # games instead of --data: an environment (a built-in name or package.module:Class) played turn by turn,
    # batch_size x grad_accum new games a step (seeds from TRAIN_GAME_SEEDS), every reply a training row
    env: str | None = None
    env_options: dict = field(default_factory=dict)
    max_turns: int = 10
    eval_games: int = 64  # evaluation games, seeds 0 to eval_games - 1
    ood_env_options: dict | None = None  # games out of distribution: these options over env_options...
    ood_context: str | None = None  # ...played with this context
    mode: str = "on-policy"  # off-policy: the paper's baseline, training on the teacher's own responses
    off_policy_loss: str = "forward-kl"  # forward KL over the teacher's top-k, or sft (token cross-entropy)
    rollouts: str | None = None  # off-policy: a folder of saved teacher rollouts to reuse (written if missing)
    consistency_weight: float = 0.0  # context-removability regulariser (0: off)
    consistency_start: int = 1  # the regulariser's first step (1: from the start, the paper's form)
    consistency_warmup: int = 0  # steps over which its weight rises linearly from 0, from consistency_start
    anchor_weight: float = 0.0  # in-context anchor: the student with the context kept at the teacher (0: off)
    # evaluation before and after (optional for real models, always on for the toy world)
    eval_data: str | None = None
    ood_data: str | None = None
    eval_batch_size: int = 64
    eval_max_new_tokens: int | None = None  # default: max_new_tokens
    eval_before: bool = True  # score the student before training too
    verifier: str = "auto"
    # output
    output_dir: str | None = None
    overwrite: bool = False
    save_every: int = 0
    # the loss
    topk: int = 256
    topk_renorm: bool = False
    topk_tail: bool = False  # the mass outside the top-k as one more bucket of both distributions
    topk_support: str = "student"  # the student's top-k ids, or the union with the teacher's (TOPK_SUPPORTS)
    teacher_kind: str = "frozen"  # frozen, ema (a moving average of the student) or live (the student itself)
    ema_decay: float = 0.99  # teacher_kind ema: teacher <- decay * teacher + (1 - decay) * student, every step
    kernel: str = "auto"
    # the mass-escape guard (on-policy): the student's mean probability inside its own top-k, watched every step
    min_topk_mass: float = 0.8  # below it: a warning, once (0: never)
    stop_on_escape: bool = False  # below it: stop, keeping the weights of the last step above it
    # optimisation
    steps: int = 50
    batch_size: int = 8  # prompts per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    # 0: a micro-batch is batch_size prompts in padded rows; N: the step's batch_size x grad_accum sequences are
    # regrouped into micro-batches of one row of at most N positions in every pass, packed without padding
    micro_batch_tokens: int = 0
    lr: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # sampling and models
    sampler: str = "hf"
    vllm_memory: float = 0.2  # vLLM's gpu_memory_utilization (on a CPU: the fraction of host memory)
    vllm_eager: bool = False  # vLLM's enforce_eager: no compilation or graphs (starts fast, samples slower)
    # LoRA students (PEFT): with lora_rank set, only adapters train; the default teacher is the student with
    # its adapters off, and the run saves the adapter and (unless merge is false) the merged model
    lora_rank: int | None = None
    lora_alpha: float | None = None  # default: twice the rank
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # or module names, comma-separated (q_proj,v_proj)
    merge: bool = True
    # several processes (torchrun): the teacher replicated on each rank, or sharded like the student
    teacher_sharding: str = "replicate"
    gradient_checkpointing: bool = False  # recompute the student's activations in the backward pass
    teacher_prefix_cache: bool = True  # the teacher reads the prompts' shared start (the context) once per run
    show_prompts: int = 1  # rows whose rendered teacher and student prompts are printed before training
    report_to: str = "none"  # also send the per-step metrics to tensorboard or wandb
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    loading: ModelOptions = field(default_factory=ModelOptions)

    def __post_init__(self):
        _check_types(self)
        _check_lora(self)
        _seed(self.seed)
        _choice("report_to", self.report_to, REPORT_TO)
        _choice("context_as", self.context_as, CONTEXT_AS)
        _choice("mode", self.mode, DISTILL_MODES)
        _choice("off_policy_loss", self.off_policy_loss, OFF_POLICY_LOSSES)
        _at_least("consistency_weight", self.consistency_weight, 0.0)
        if not self.on_policy and self.consistency_weight > 0:
            raise OpcdError("the consistency regulariser needs on-policy rollouts; drop --consistency-weight or use --mode on-policy")
        _at_least("consistency_start", self.consistency_start, 1)
        _at_least("consistency_warmup", self.consistency_warmup, 0)
        if (self.consistency_start != 1 or self.consistency_warmup) and not self.consistency_weight > 0:
            raise OpcdError("--consistency-start and --consistency-warmup schedule the regulariser; "
                            "give --consistency-weight too")
        _at_least("anchor_weight", self.anchor_weight, 0.0)
        if not self.on_policy and self.anchor_weight > 0:
            raise OpcdError("the in-context anchor scores the student's own rollouts; drop --anchor-weight or use --mode on-policy")
        _choice("verifier", self.verifier, VERIFIERS)
        _choice("kernel", self.kernel, KERNELS)
        _choice("topk_support", self.topk_support, TOPK_SUPPORTS)
        _choice("teacher_kind", self.teacher_kind, TEACHER_KINDS)
        _choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("teacher_sharding", self.teacher_sharding, TEACHER_SHARDING)
        _fraction("vllm_memory", self.vllm_memory)
        if self.output_dir is not None and not self.output_dir.strip():
            raise OpcdError("--output-dir is empty; give the name of the folder to write (or leave it out for runs/NAME-TIME)")
        if self.ood_data is not None and self.eval_data is None:
            raise OpcdError("--ood-data is scored beside --eval-data; give --eval-data too")
        if self.student is None and self.data is not None:
            raise OpcdError("--data needs --student: give the model to train (or drop --data to run the toy world)")
        if self.student is not None and self.data is None and self.env is None:
            raise OpcdError("--student needs --data: give the prompts to train on (JSONL, JSON, CSV, Parquet or a saved "
                            "dataset), or --env: a game to play")
        if self.plays_games:
            if self.data is not None:
                raise OpcdError("give --data (prompts) or --env (a game to play), not both")
            if self.eval_data is not None or self.ood_data is not None:
                raise OpcdError("with --env the evaluation plays games: use --eval-games and --ood-env-options, "
                                "not --eval-data or --ood-data")
            _at_least("max_turns", self.max_turns, 1)
            _at_least("eval_games", self.eval_games, 0)
        if (self.ood_env_options is None) != (self.ood_context is None) or (self.ood_context and not self.plays_games):
            raise OpcdError("games out of distribution need --env, --ood-env-options and --ood-context together")
        if self.topk < 1:
            raise OpcdError(f"topk must be at least 1; got {self.topk}")
        if self.topk_renorm and self.topk_tail:
            raise OpcdError("--topk-renorm and --topk-tail each make the top-k a whole distribution; choose one")
        if self.topk_tail and not self.on_policy:
            raise OpcdError("--topk-tail shapes the on-policy loss over the student's top-k; drop it with --mode off-policy")
        if self.teacher_kind != "frozen":
            if not self.on_policy:
                raise OpcdError(f"--teacher-kind {self.teacher_kind} moves the teacher during on-policy training; "
                                "off-policy the teacher's rollouts are made once: drop it with --mode off-policy")
            if self.teacher is not None:
                raise OpcdError(f"--teacher-kind {self.teacher_kind} makes the teacher from the student; drop --teacher")
            if self.teacher_kind == "ema" and self.lora_rank is not None:
                raise OpcdError("--teacher-kind ema averages the student's full weights; with --lora-rank use "
                                "--teacher-kind live or frozen")
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) or \
                not 0 < self.ema_decay < 1:
            raise OpcdError(f"ema_decay must be in (0, 1) (0.99: the teacher takes 1% of each step); got {self.ema_decay!r}")
        _check_dependent(self)
        if self.topk_support != "student" and not self.on_policy:
            raise OpcdError("--topk-support chooses the on-policy loss's support; off-policy the support is the "
                            "teacher's saved top-k: drop it with --mode off-policy")
        if isinstance(self.min_topk_mass, bool) or not isinstance(self.min_topk_mass, (int, float)) or \
                not 0 <= self.min_topk_mass < 1:
            raise OpcdError(f"min_topk_mass must be a fraction in [0, 1) (0: no guard); got {self.min_topk_mass!r}")
        if self.stop_on_escape and (not self.on_policy or self.min_topk_mass == 0):
            raise OpcdError("--stop-on-escape watches the student's own top-k mass on-policy; it needs --mode on-policy "
                            "and a --min-topk-mass above 0")
        _at_least("steps", self.steps, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("grad_accum", self.grad_accum, 1)
        _at_least("micro_batch_tokens", self.micro_batch_tokens, 0)
        _at_least("eval_batch_size", self.eval_batch_size, 1)
        _at_least("save_every", self.save_every, 0)
        _at_least("show_prompts", self.show_prompts, 0)
        if self.save_every > self.steps:
            raise OpcdError(f"save_every {self.save_every} is more than the {self.steps} steps, so no checkpoint "
                            f"would be kept; use at most {self.steps} (or 0 for the final model only)")
        _at_least("warmup_steps", self.warmup_steps, 0)
        _at_least("weight_decay", self.weight_decay, 0.0)
        if self.eval_max_new_tokens is not None:
            _at_least("eval_max_new_tokens", self.eval_max_new_tokens, 1)
        if not self.lr > 0:
            raise OpcdError(f"lr must be positive; got {self.lr}")
        if not self.max_grad_norm > 0:
            raise OpcdError(f"max_grad_norm must be positive; got {self.max_grad_norm}")
        if self.sampling.n != 1:
            raise OpcdError("on-policy distillation samples one response per prompt; set n = 1 (raise batch_size instead)")

    def consistency_weight_at(self, step: int) -> float:
        """The regulariser's weight at ``step`` (from 1): 0 before ``consistency_start``, then rising linearly to
        ``consistency_weight`` over ``consistency_warmup`` steps (at once without a warm-up)."""
        if step < self.consistency_start:
            return 0.0
        if self.consistency_warmup == 0:
            return self.consistency_weight
        return self.consistency_weight * min(1.0, (step - self.consistency_start + 1) / self.consistency_warmup)

    @property
    def per_step(self) -> int:
        """Prompts (or games) a step: ``batch_size`` x ``grad_accum``, over every process."""
        return self.batch_size * self.grad_accum

    @property
    def on_policy(self) -> bool:
        """Whether the student trains on its own responses (the paper's method), not the teacher's."""
        return self.mode == "on-policy"

    @property
    def plays_games(self) -> bool:
        """Whether the run plays games (``--env``) instead of reading rows."""
        return self.env is not None

    @property
    def context_pass(self) -> bool:
        """Whether each micro-batch has a second student pass, with the context (the regulariser, the anchor)."""
        return self.consistency_weight > 0 or self.anchor_weight > 0

    def inputs(self) -> dict[str, str | None]:
        """What the run reads, by flag: an output may be none of them, hold none and lie in none."""
        return {"--student": self.student, "--teacher": self.teacher, "--data": self.data, "--context": self.context,
                "--eval-data": self.eval_data, "--ood-data": self.ood_data, "--ood-context": self.ood_context,
                "--rollouts": self.rollouts}

    def default_output_dir(self) -> str:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = self.name or Path(str(self.student).replace(":", "-")).name
        return str(Path("runs") / f"{name}-{stamp}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EvalConfig:
    models: tuple[str, ...] = ()  # --model, once or more
    data: str | None = None  # rows with answers; or, with `env`, games
    ood_data: str | None = None  # scored with each row's own context
    best: int | None = None  # a run directory scores as the mean of its `best` best checkpoints
    context: str | None = None
    context_as: str = "system"
    verifier: str = "auto"
    batch_size: int = 64
    seed: int = 0
    limit: int | None = None
    sampler: str = "hf"
    vllm_memory: float = 0.2
    vllm_eager: bool = False
    # games: an environment (a built-in name or package.module:Class) played `games` times, seeds seed, seed+1...
    env: str | None = None
    env_options: dict = field(default_factory=dict)
    games: int = 64
    max_turns: int = 10
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions(temperature=0.0))
    loading: ModelOptions = field(default_factory=ModelOptions)

    def __post_init__(self):
        _check_types(self)
        if not self.models:
            raise OpcdError("give at least one --model (a Hugging Face id or a local directory)")
        _seed(self.seed)
        if (self.data is None) == (self.env is None):
            raise OpcdError("give --data (rows with answers) or --env (a game to play), one of the two")
        _at_least("games", self.games, 1)
        _at_least("max_turns", self.max_turns, 1)
        if self.env is not None and (self.ood_data is not None or self.best is not None or self.limit is not None):
            raise OpcdError("--ood-data, --best and --limit score datasets; with --env, use --games")
        _choice("context_as", self.context_as, CONTEXT_AS)
        _choice("verifier", self.verifier, VERIFIERS)
        _at_least("batch_size", self.batch_size, 1)
        if self.limit is not None:
            _at_least("limit", self.limit, 1)
        if self.best is not None:
            _at_least("best", self.best, 1)
        _choice("sampler", self.sampler, SAMPLERS)
        _fraction("vllm_memory", self.vllm_memory)
        if self.sampling.temperature == 0 and self.sampling.n > 1:
            raise OpcdError("greedy decoding (temperature 0) gives one answer; set --temperature above 0 to draw several samples")


@dataclass(frozen=True)
class ExtractConfig:
    """``opcd extract``: solve, extract experience items, accumulate, select on validation, for ``rounds`` rounds."""

    model: str | None = None  # an id, a folder, or a built-in name (toy:small)
    data: str | None = None  # training problems with answers
    val: str | None = None  # validation problems with answers
    output: str = "exp.txt"
    overwrite: bool = False
    rounds: int = 3
    attempts: int = 4  # attempts per training problem and round
    experience: str | None = None  # an experience file to start from
    template: str | None = None  # extraction prompt template with a {traces} placeholder
    traces_per_prompt: int = 6
    token_budget: int = 2048  # the experience is kept within this many tokens by dropping whole items
    context_as: str = "system"
    verifier: str = "auto"
    batch_size: int = 64
    seed: int = 0
    sampler: str = "hf"
    vllm_memory: float = 0.2
    vllm_eager: bool = False
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions(temperature=1.0, max_new_tokens=1024))
    extract_max_new_tokens: int = 512
    # games instead of --data and --val: the model plays train_games games (each `attempts` times) a round, and
    # each round's experience is scored by the success rate over val_games other games
    env: str | None = None
    env_options: dict = field(default_factory=dict)
    max_turns: int = 10
    train_games: int = 32
    val_games: int = 32
    loading: ModelOptions = field(default_factory=ModelOptions)

    def __post_init__(self):
        _check_types(self)
        if not self.output.strip():
            raise OpcdError("--output is empty; give the experience file to write (e.g. exp.txt)")
        _seed(self.seed)
        if self.env is not None:
            if self.data is not None or self.val is not None:
                raise OpcdError("give --data and --val (problems) or --env (a game to play), not both")
            if self.model is None:
                raise OpcdError("--env needs --model: the model that plays and extracts")
            for name in ("max_turns", "train_games", "val_games"):
                _at_least(name, getattr(self, name), 1)
        elif (self.model is None) != (self.data is None) or (self.model is None) != (self.val is None):
            raise OpcdError("give --model, --data and --val together (or none of them to run the toy world)")
        _choice("context_as", self.context_as, CONTEXT_AS)
        _choice("verifier", self.verifier, VERIFIERS)
        _choice("sampler", self.sampler, SAMPLERS)
        _fraction("vllm_memory", self.vllm_memory)
        for name in ("rounds", "attempts", "traces_per_prompt", "token_budget", "batch_size", "extract_max_new_tokens"):
            _at_least(name, getattr(self, name), 1)



def parse_json_object(text: str | None, flag: str = "--chat-template-kwargs",
                      example: str = '{"enable_thinking": false}') -> dict | None:
    """A flag's JSON object of keyword arguments: ``--chat-template-kwargs`` (for every chat template render)
    unless another ``flag`` is named."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise OpcdError(f"{flag} must be a JSON object such as '{example}'; {text!r} is not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise OpcdError(f"{flag} must be a JSON object such as '{example}'; got {text!r}")
    return value


def _given(cfg, names) -> list[str]:
    """Those of ``names`` that differ from their defaults: settings a flag or a recipe gave."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in fields(cfg)}
    return [name for name in names if getattr(cfg, name) != defaults[name]]


def _check_dependent(cfg: "DistillConfig") -> None:
    """Settings that only act with another one are refused without it, instead of being ignored."""
    rules = [(("ema_decay",), cfg.teacher_kind == "ema", "--teacher-kind ema (the moving average it sets)"),
             (("vllm_memory", "vllm_eager"), cfg.sampler == "vllm", "--sampler vllm"),
             (("env_options", "max_turns", "eval_games"), cfg.plays_games, "--env (the game they set up)"),
             (("off_policy_loss", "rollouts"), not cfg.on_policy, "--mode off-policy")]
    for names, present, needed in rules:
        given = _given(cfg, names)
        if given and not present:
            flag = "--" + given[0].replace("_", "-")
            raise OpcdError(f"{flag} only acts with {needed}; give that too, or drop {flag}")


def _check_lora(cfg) -> None:
    if cfg.lora_rank is None:
        given = [name for name, default in (("lora_alpha", None), ("lora_dropout", 0.0), ("lora_targets", "all-linear"))
                 if getattr(cfg, name) != default]
        if given:
            raise OpcdError(f"{given[0]} sets up a LoRA student; give lora_rank too (e.g. --lora-rank 16)")
        return
    if cfg.lora_rank < 1:
        raise OpcdError(f"lora_rank must be at least 1 (leave it out to train every weight); got {cfg.lora_rank}")
    if cfg.lora_alpha is not None and not cfg.lora_alpha > 0:
        raise OpcdError(f"lora_alpha must be positive; got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise OpcdError(f"lora_dropout must be in [0, 1); got {cfg.lora_dropout}")
    if not lora_target_names(cfg.lora_targets):
        raise OpcdError("lora_targets is empty; give all-linear or module names such as q_proj,v_proj")


def lora_target_names(targets: str) -> str | list[str]:
    """``all-linear``, or the module names of a comma-separated list."""
    if targets.strip() == "all-linear":
        return "all-linear"
    return [name.strip() for name in targets.split(",") if name.strip()]


SEED_LIMIT = 2**63 - 1  # torch.manual_seed takes 64 bits; the seeds derived per process and step add to it


def _seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_LIMIT - 2**40:
        raise OpcdError(f"seed must be a whole number from 0 to {SEED_LIMIT - 2**40}; got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OpcdError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise OpcdError(f"{name} must be a fraction in (0, 1]; got {value!r}")


def _at_least(name: str, value: Any, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise OpcdError(f"{name} must be a number of at least {low:g}; got {value!r}")


# --- building configs from layers ----------------------------------------------------------------------

_NESTED = {"sampling": SamplingOptions, "loading": ModelOptions}


def read_recipe(path: str | Path, cls=None) -> dict[str, Any]:
    """A recipe's settings as a flat dict: a TOML file, or the name of a packaged recipe (``toy-codes``).

    Nested tables ``[sampling]`` and ``[loading]`` are allowed; keys are checked against ``cls``
    (``DistillConfig`` by default).
    """
    from .sources import builtin_recipes, recipe_file

    file = Path(path)
    if not file.is_file():
        builtin = recipe_file(str(path)) if not any(sep in str(path) for sep in "/\\") else None
        if builtin is None:
            raise OpcdError(f"recipe file {path} does not exist (built-in recipes: {', '.join(builtin_recipes())})")
        file = builtin
    try:
        with file.open("rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OpcdError(f"recipe file {path} is not valid TOML: {e}") from None
    return flatten_settings(data, source=str(path), cls=cls or DistillConfig)


def flatten_settings(data: dict[str, Any], source: str = "settings", cls=None) -> dict[str, Any]:
    """Turn ``{"sampling": {"temperature": 0.6}}`` into ``{"temperature": 0.6}`` and reject unknown keys."""
    cls = cls or DistillConfig
    known = {f.name for f in fields(cls)} - set(_NESTED)
    nested = {name: {f.name for f in fields(nested_cls)} for name, nested_cls in _NESTED.items()}
    command = {ExtractConfig: "extract", EvalConfig: "eval"}.get(cls, "distill")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key in nested and isinstance(value, dict):
            for sub, subvalue in value.items():
                sub = sub.replace("-", "_")
                if sub not in nested[key]:
                    raise OpcdError(f"{source}: unknown setting {key}.{sub}; known: {', '.join(sorted(nested[key]))}")
                check_value(f"{key}.{sub}", subvalue, _hints(_NESTED[key])[sub], where=f"{source}: ")
                flat[sub] = subvalue
        elif key in known:
            check_value(key, value, _hints(cls)[key], where=f"{source}: ")
            flat[key] = value
        elif any(key in names for names in nested.values()):
            owner = next(n for n, names in nested.items() if key in names)
            check_value(key, value, _hints(_NESTED[owner])[key], where=f"{source}: ")
            flat[key] = value
        else:
            raise OpcdError(f"{source}: unknown setting {key!r}; see `opcd {command} --help` for the names")
    return flat


RESUMABLE = ("steps", "save_every", "show_prompts", "teacher_sharding", "gradient_checkpointing",
             "teacher_prefix_cache", "micro_batch_tokens", "min_topk_mass", "stop_on_escape")  # what a resumed run
# may change: train further, keep checkpoints, how it runs, what is printed and watched
PERMISSIONS = ("trust_remote_code", "allow_bin_weights", "report_to")  # what a run may do beyond reading its
# inputs (run a model's code, unpickle weights, send metrics away): given on the command line of every
# invocation, never read from a run folder, which is data that travels


def _flag_list(keys) -> str:
    flags = ["--" + k.replace("_", "-") for k in keys]
    return ", ".join(flags[:-1]) + f" and {flags[-1]}" if len(flags) > 1 else flags[0]


def is_python_env(env: str | None) -> bool:
    """Whether ``--env`` names the user's own class (``package.module:Class``), not a built-in game."""
    return env is not None and ":" in env


@dataclass(frozen=True)
class Resumed:
    """A run to continue: its configuration (its own settings, the permissions of this command line) and the
    flags of the permissions its folder records that this command line does not give (so not used)."""

    config: "DistillConfig"
    not_given: tuple[str, ...]  # e.g. ("--trust-remote-code", "--report-to wandb")


def resume_config(run: str, flags: dict[str, Any]) -> Resumed:
    """The configuration of the run to continue (its ``.partial`` folder, or a finished run), with the settings of
    ``RESUMABLE`` and ``PERMISSIONS`` from ``flags``; any other flag that differs from the run's own setting is
    an error. Nothing read from the run folder turns a permission on: those come from ``flags`` alone, and a
    game class of the user's (``package.module:Class``, code) runs only when ``--env`` names it again."""
    folder = Path(run)
    if not folder.is_dir():
        raise OpcdError(f"--resume {run}: no such run folder")
    final = folder.with_name(folder.name.removesuffix(".partial"))
    try:
        saved = json.loads((folder / "opcd_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OpcdError(f"--resume {run}: cannot read its opcd_config.json ({type(e).__name__}); is it an opcd run?") from None
    if not isinstance(saved, dict):
        raise OpcdError(f"--resume {run}: its opcd_config.json holds {type(saved).__name__}, not the run's settings; "
                        "is it an opcd run?")
    settings = flatten_settings(saved, source=str(folder / "opcd_config.json"))
    given = {key.replace("-", "_"): value for key, value in flags.items() if value is not None}
    differing = sorted(key for key, value in given.items()
                       if key not in RESUMABLE + PERMISSIONS and key not in ("output_dir", "overwrite")
                       and settings.get(key) != value)
    if differing:
        raise OpcdError(f"--resume continues {run} with its own settings; these flags differ from them: "
                        f"{', '.join('--' + k.replace('_', '-') for k in differing)} (only {_flag_list(RESUMABLE)} "
                        f"may change; {_flag_list(PERMISSIONS)} are given anew each time)")
    if given.get("overwrite"):
        raise OpcdError("--resume continues a run where it stopped; it cannot be combined with --overwrite")
    if given.get("output_dir") is not None and Path(given["output_dir"]).expanduser().resolve() != final.resolve():
        raise OpcdError(f"--resume continues {run} in its own folder ({final}); drop --output-dir")
    if is_python_env(settings.get("env")) and given.get("env") != settings["env"]:
        raise OpcdError(f"{run} plays --env {settings['env']}, a class of your own (Python code); a run folder never "
                        f"runs code by itself: give --env {settings['env']} again to resume it")
    defaults = {f.name: f.default for f in fields(DistillConfig)} | {f.name: f.default for f in fields(ModelOptions)}
    not_given = tuple(_flag_list([key]) + ("" if isinstance(defaults[key], bool) else f" {settings[key]}")
                      for key in PERMISSIONS if key not in given and settings.get(key, defaults[key]) != defaults[key])
    changes = {key: given[key] for key in RESUMABLE if key in given}
    permissions = {key: given.get(key, defaults[key]) for key in PERMISSIONS}
    return Resumed(build_distill_config(settings, changes, permissions, {"output_dir": str(final), "overwrite": False}),
                   not_given)


def build_config(cls, *layers: dict[str, Any]):
    """Merge flat setting dicts (later wins, None means "not given") into a validated ``cls``.

    Keys of the nested ``sampling`` and ``loading`` options go to those; the rest to ``cls`` itself.
    Every field of ``cls`` needs a default.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k.replace("-", "_"): v for k, v in layer.items() if v is not None})
    nested_values = {name: {} for name in _NESTED}
    top: dict[str, Any] = {}
    for key, value in merged.items():
        owner = next((name for name, nested_cls in _NESTED.items() if key in {f.name for f in fields(nested_cls)}), None)
        (nested_values[owner] if owner else top)[key] = value
    # nested options start from the command's own defaults (extract samples at temperature 1, eval greedily)
    defaults = {f.name: f.default_factory() for f in fields(cls) if f.name in _NESTED}
    try:
        nested = {name: dataclasses.replace(defaults[name], **values) for name, values in nested_values.items()}
        return cls(**top, **nested)
    except TypeError as e:  # a value of the wrong type, or a setting this command does not take
        raise OpcdError(f"bad setting: {e}") from None


def build_distill_config(*layers: dict[str, Any]) -> DistillConfig:
    return build_config(DistillConfig, *layers)


def build_extract_config(*layers: dict[str, Any]) -> ExtractConfig:
    return build_config(ExtractConfig, *layers)
