"""The option records a configuration is made of, each frozen and checking its own fields: how models load and
how responses are sampled (every command), and the groups of ``opcd distill``'s settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import OpcdError
from ..verifiers import VERIFIERS as VERIFIER_FUNCTIONS
from .checks import at_least, check_types, choice, fraction, positive

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
USER_PREFIX_CONSISTENCY_WEIGHT = 0.02  # the regulariser's weight by default with --context-as user-prefix, from the
# second half of the run (bench/placement_study.py)
# the on-policy objective (loss.py): the paper's top-k reverse KL over the student's top-k; the reverse KL on the
# sampled tokens only (a policy-gradient step); the forward KL over the teacher's top-k; the generalised JSD
OBJECTIVES = ("topk-reverse-kl", "sampled-token", "topk-forward-kl", "jsd")


@dataclass(frozen=True)
class ModelOptions:
    """How models are loaded (shared by every command)."""

    dtype: str = "auto"
    trust_remote_code: bool = False  # run a model's own Python code (config.json's auto_map)
    allow_bin_weights: bool = False  # load pickled *.bin weights (through PyTorch's weights-only unpickler)
    chat_template_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        check_types(self)
        choice("dtype", self.dtype, DTYPES)


@dataclass(frozen=True)
class SamplingOptions:
    """How responses are generated. ``temperature`` 0 means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    n: int = 1

    def __post_init__(self):
        check_types(self)
        at_least("temperature", self.temperature, 0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise OpcdError(f"top_p must be in (0, 1]; got {self.top_p}")
        at_least("max_new_tokens", self.max_new_tokens, 1)
        at_least("n", self.n, 1)


@dataclass(frozen=True)
class GameOptions:
    """Games instead of ``--data``: an environment (a built-in name or package.module:Class) played turn by
    turn, batch_size x grad_accum new games a step (seeds from TRAIN_GAME_SEEDS), every reply a training row."""

    env: str | None = None
    env_options: dict = field(default_factory=dict)
    max_turns: int = 10
    eval_games: int = 64  # evaluation games, seeds 0 to eval_games - 1
    ood_env_options: dict | None = None  # games out of distribution: these options over env_options...
    ood_context: str | None = None  # ...played with this context

    def __post_init__(self):
        check_types(self)
        if self.env is not None:
            at_least("max_turns", self.max_turns, 1)
            at_least("eval_games", self.eval_games, 0)
        if (self.ood_env_options is None) != (self.ood_context is None) or (self.ood_context and self.env is None):
            raise OpcdError("games out of distribution need --env, --ood-env-options and --ood-context together")


@dataclass(frozen=True)
class LossOptions:
    """The objective: the top-k KL's support and shape, its implementation, the off-policy loss, the
    regularisers, and the mass-escape guard that watches it."""

    objective: str = "topk-reverse-kl"  # the on-policy distillation term (OBJECTIVES)
    jsd_beta: float = 0.5  # objective jsd: the teacher's share of the mixture (0: forward KL, 1: reverse KL)
    topk: int = 256
    topk_renorm: bool = False
    topk_tail: bool = False  # the mass outside the top-k as one more bucket of both distributions
    topk_support: str = "student"  # the student's top-k ids, or the union with the teacher's (TOPK_SUPPORTS)
    kernel: str = "auto"
    off_policy_loss: str = "forward-kl"  # forward KL over the teacher's top-k, or sft (token cross-entropy)
    consistency_weight: float = 0.0  # context-removability regulariser (0: off)
    consistency_start: int = 1  # the regulariser's first step (1: from the start, the paper's form)
    consistency_warmup: int = 0  # steps over which its weight rises linearly from 0, from consistency_start
    anchor_weight: float = 0.0  # in-context anchor: the student with the context kept at the teacher (0: off)
    anchor_start: int = 1  # the anchor's first step
    anchor_warmup: int = 0  # steps over which its weight rises linearly from 0, from anchor_start
    # with the context in the user's turn and neither the regulariser nor the anchor asked for: the regulariser at
    # USER_PREFIX_CONSISTENCY_WEIGHT from the second half of the run (``DistillConfig``); False leaves it off
    user_prefix_consistency: bool = True
    # the verifier's reward on the student's samples, as a policy-gradient term beside the distillation term
    reward_weight: float = 0.0  # 0: off
    reward_std: bool = False  # the advantage over the group's standard deviation too (GRPO), not only less its mean
    # the mass-escape guard (on-policy): the student's mean probability inside its own top-k, watched every step
    min_topk_mass: float = 0.8  # below it: a warning, once (0: never)
    stop_on_escape: bool = False  # below it: stop, keeping the weights of the last step above it

    def __post_init__(self):
        check_types(self)
        choice("off_policy_loss", self.off_policy_loss, OFF_POLICY_LOSSES)
        at_least("consistency_weight", self.consistency_weight, 0.0)
        at_least("consistency_start", self.consistency_start, 1)
        at_least("consistency_warmup", self.consistency_warmup, 0)
        if (self.consistency_start != 1 or self.consistency_warmup) and not self.consistency_weight > 0:
            raise OpcdError("--consistency-start and --consistency-warmup schedule the regulariser; "
                            "give --consistency-weight too")
        at_least("anchor_weight", self.anchor_weight, 0.0)
        at_least("anchor_start", self.anchor_start, 1)
        at_least("anchor_warmup", self.anchor_warmup, 0)
        if (self.anchor_start != 1 or self.anchor_warmup) and not self.anchor_weight > 0:
            raise OpcdError("--anchor-start and --anchor-warmup schedule the in-context anchor; give --anchor-weight too")
        choice("kernel", self.kernel, KERNELS)
        choice("topk_support", self.topk_support, TOPK_SUPPORTS)
        self._check_objective()
        at_least("reward_weight", self.reward_weight, 0.0)
        if self.reward_std and not self.reward_weight > 0:
            raise OpcdError("--reward-std scales the reward's advantage; give --reward-weight too")
        if self.topk < 1:
            raise OpcdError(f"topk must be at least 1; got {self.topk}")
        if self.topk_renorm and self.topk_tail:
            raise OpcdError("--topk-renorm and --topk-tail each make the top-k a whole distribution; choose one")
        if not 0 <= self.min_topk_mass < 1:
            raise OpcdError(f"min_topk_mass must be a fraction in [0, 1) (0: no guard); got {self.min_topk_mass!r}")

    def _check_objective(self) -> None:
        """What shapes one objective is refused with another, in one line."""
        choice("objective", self.objective, OBJECTIVES)
        if isinstance(self.jsd_beta, bool) or not 0.0 <= self.jsd_beta <= 1.0:
            raise OpcdError(f"jsd_beta must be in [0, 1] (0: the forward KL, 1: the reverse KL); got {self.jsd_beta!r}")
        if self.jsd_beta != LossOptions.jsd_beta and self.objective != "jsd":
            raise OpcdError("--jsd-beta sets the mixture of --objective jsd; give --objective jsd too, or drop --jsd-beta")
        if self.objective == "topk-reverse-kl":
            return
        what = {"sampled-token": "reads only the sampled token", "jsd": "is over the full vocabulary",
                "topk-forward-kl": "is over the teacher's top-k"}[self.objective]
        for flag, given in (("--topk-support union", self.topk_support != "student"), ("--topk-tail", self.topk_tail),
                            ("--topk-renorm", self.topk_renorm), ("--stop-on-escape", self.stop_on_escape),
                            ("--min-topk-mass", self.min_topk_mass != LossOptions.min_topk_mass)):
            if given:
                raise OpcdError(f"{flag} shapes or watches the top-k reverse KL over the student's top-k, and --objective "
                                f"{self.objective} {what}; drop {flag.split()[0]} or use --objective topk-reverse-kl")

    @property
    def watches_topk_mass(self) -> bool:
        """Whether the escape guard watches the student's mass inside its own top-k (the top-k reverse KL's)."""
        return self.objective == "topk-reverse-kl"

    def consistency_weight_at(self, step: int) -> float:
        """The regulariser's weight at ``step`` (from 1): 0 before ``consistency_start``, then rising linearly to
        ``consistency_weight`` over ``consistency_warmup`` steps (at once without a warm-up)."""
        return scheduled(self.consistency_weight, self.consistency_start, self.consistency_warmup, step)

    def anchor_weight_at(self, step: int) -> float:
        """The anchor's weight at ``step``, scheduled as the regulariser's (``anchor_start``, ``anchor_warmup``)."""
        return scheduled(self.anchor_weight, self.anchor_start, self.anchor_warmup, step)

    @property
    def context_pass(self) -> bool:
        """Whether each micro-batch has a second student pass, with the context (the regulariser, the anchor)."""
        return self.consistency_weight > 0 or self.anchor_weight > 0


def scheduled(weight: float, start: int, warmup: int, step: int) -> float:
    """A term's weight at ``step`` (from 1): 0 before ``start``, then rising linearly to ``weight`` over
    ``warmup`` steps (at once without a warm-up)."""
    if step < start:
        return 0.0
    return weight if warmup == 0 else weight * min(1.0, (step - start + 1) / warmup)


@dataclass(frozen=True)
class OptimOptions:
    """The optimisation: how many steps, how many prompts a step and in what micro-batches, AdamW and its
    learning-rate schedule."""

    steps: int = 50
    batch_size: int = 8  # prompts per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    # 0: a micro-batch is batch_size prompts in padded rows; N: the step's batch_size x grad_accum sequences are
    # regrouped into micro-batches of one row of at most N positions in every pass, packed without padding
    micro_batch_tokens: int = 0
    samples_per_prompt: int = 1  # on-policy: the student's responses to each prompt of a step (a group)
    lr: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check_types(self)
        choice("lr_schedule", self.lr_schedule, SCHEDULES)
        for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("micro_batch_tokens", 0),
                          ("samples_per_prompt", 1),
                          ("warmup_steps", 0), ("weight_decay", 0.0)):
            at_least(name, getattr(self, name), low)
        positive("lr", self.lr)
        positive("max_grad_norm", self.max_grad_norm)

    @property
    def per_step(self) -> int:
        """Prompts (or games) a step: ``batch_size`` x ``grad_accum``, over every process."""
        return self.batch_size * self.grad_accum


@dataclass(frozen=True)
class EvalOptions:
    """The evaluation before and after training (optional for real models, always on for the toy world)."""

    eval_data: str | None = None
    ood_data: str | None = None
    eval_batch_size: int = 64
    eval_max_new_tokens: int | None = None  # default: max_new_tokens
    eval_before: bool = True  # score the student before training too
    verifier: str = "auto"

    def __post_init__(self):
        check_types(self)
        choice("verifier", self.verifier, VERIFIERS)
        if self.ood_data is not None and self.eval_data is None:
            raise OpcdError("--ood-data is scored beside --eval-data; give --eval-data too")
        at_least("eval_batch_size", self.eval_batch_size, 1)
        if self.eval_max_new_tokens is not None:
            at_least("eval_max_new_tokens", self.eval_max_new_tokens, 1)


@dataclass(frozen=True)
class OutputOptions:
    """Where the run goes and what it tells: its folder, its checkpoints, the prompts shown, a tracker."""

    output_dir: str | None = None
    overwrite: bool = False
    save_every: int = 0
    show_prompts: int = 1  # rows whose rendered teacher and student prompts are printed before training
    report_to: str = "none"  # also send the per-step metrics to tensorboard or wandb

    def __post_init__(self):
        check_types(self)
        choice("report_to", self.report_to, REPORT_TO)
        if self.output_dir is not None and not self.output_dir.strip():
            raise OpcdError("--output-dir is empty; give the name of the folder to write (or leave it out for runs/NAME-TIME)")
        at_least("save_every", self.save_every, 0)
        at_least("show_prompts", self.show_prompts, 0)


@dataclass(frozen=True)
class EngineOptions:
    """How the work runs: the sampling engine, and the teacher and the student under several processes."""

    sampler: str = "hf"
    vllm_memory: float = 0.2  # vLLM's gpu_memory_utilization (on a CPU: the fraction of host memory)
    vllm_eager: bool = False  # vLLM's enforce_eager: no compilation or graphs (starts fast, samples slower)
    # several processes (torchrun): the teacher replicated on each rank, or sharded like the student
    teacher_sharding: str = "replicate"
    gradient_checkpointing: bool = False  # recompute the student's activations in the backward pass
    teacher_prefix_cache: bool = True  # the teacher reads the prompts' shared start (the context) once per run

    def __post_init__(self):
        check_types(self)
        choice("sampler", self.sampler, SAMPLERS)
        choice("teacher_sharding", self.teacher_sharding, TEACHER_SHARDING)
        fraction("vllm_memory", self.vllm_memory)


@dataclass(frozen=True)
class LoraOptions:
    """LoRA students (PEFT): with lora_rank set, only adapters train; the default teacher is the student with its
    adapters off, and the run saves the adapter and (unless merge is false) the merged model."""

    lora_rank: int | None = None
    lora_alpha: float | None = None  # default: twice the rank
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # or module names, comma-separated (q_proj,v_proj)
    merge: bool = True

    def __post_init__(self):
        check_types(self)
        if self.lora_rank is None:
            given = [name for name, default in (("lora_alpha", None), ("lora_dropout", 0.0),
                                                 ("lora_targets", "all-linear")) if getattr(self, name) != default]
            if given:
                raise OpcdError(f"{given[0]} sets up a LoRA student; give lora_rank too (e.g. --lora-rank 16)")
            return
        if self.lora_rank < 1:
            raise OpcdError(f"lora_rank must be at least 1 (leave it out to train every weight); got {self.lora_rank}")
        if self.lora_alpha is not None:
            positive("lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise OpcdError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if not lora_target_names(self.lora_targets):
            raise OpcdError("lora_targets is empty; give all-linear or module names such as q_proj,v_proj")

    @property
    def alpha(self) -> float | None:
        """The scaling alpha in use: ``lora_alpha``, else twice the rank (None without LoRA)."""
        return None if self.lora_rank is None else self.lora_alpha or 2 * self.lora_rank


def lora_target_names(targets: str) -> str | list[str]:
    """``all-linear``, or the module names of a comma-separated list."""
    if targets.strip() == "all-linear":
        return "all-linear"
    return [name.strip() for name in targets.split(",") if name.strip()]


@dataclass(frozen=True)
class FieldOptions:
    """Which columns of a row are its prompt, chat, context and answer, for rows in no format opcd recognises:
    dotted paths into nested objects (``reward_model.ground_truth``), or templates over the row's columns
    (``{question}\nA) {opa}``; ``{cop:letter}`` writes 0 as A, ``{cop:letter1}`` writes 1 as A); and which split of
    a dataset by name (``hf:ORG/NAME``) is read."""

    prompt_field: str | None = None
    messages_field: str | None = None
    context_field: str | None = None
    answer_field: str | None = None
    prompt_template: str | None = None
    answer_template: str | None = None
    split: str | None = None  # the split of an hf: dataset (hub_data.py): --data's, and opcd eval's --ood-data's
    eval_split: str | None = None  # opcd distill's --eval-data and --ood-data, opcd extract's --val

    def __post_init__(self):
        check_types(self)
        for name in ("split", "eval_split"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise OpcdError(f"--{name.replace('_', '-')} is empty; give a split's name, such as train or test")
        for name in ("prompt_field", "messages_field", "context_field", "answer_field"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or any(not part for part in value.split("."))):
                raise OpcdError(f"--{name.replace('_', '-')} {value!r} is not a column name or a dotted path "
                                "such as reward_model.ground_truth")
        for a, b in (("prompt_field", "prompt_template"), ("answer_field", "answer_template"),
                     ("prompt_field", "messages_field"), ("prompt_template", "messages_field")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise OpcdError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} both say where the "
                                f"{a.split('_')[0]} comes from; give one")

    @property
    def given(self) -> bool:
        """Whether a column mapping is given (the splits choose rows, not columns)."""
        return any(value is not None for key, value in vars(self).items() if key not in ("split", "eval_split"))

    def check_splits(self, sources: dict[str, dict[str, str | None]]) -> None:
        """A split names a split of a dataset by name: ``sources`` maps ``split`` and ``eval_split`` to the flags
        (and their values) each applies to in this command; a split for none of them is one line."""
        from ..hub_data import is_hub_name

        for name in ("split", "eval_split"):
            value = getattr(self, name)
            if value is None:
                continue
            flag = "--" + name.replace("_", "-")
            applies = sources.get(name)
            if applies is None:
                raise OpcdError(f"{flag} does not apply to this command; use --split")
            if not any(is_hub_name(source) for source in applies.values()):
                raise OpcdError(f"{flag} {value} chooses the split of a dataset by name ({' or '.join(applies)} "
                                "hf:ORG/NAME); a file or folder has no splits: drop it")

