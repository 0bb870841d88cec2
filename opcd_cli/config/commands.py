"""The configurations of ``opcd eval`` and ``opcd extract``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import OpcdError
from .checks import at_least, check_seed, check_types, choice, fraction
from .options import CONTEXT_AS, SAMPLERS, VERIFIERS, FieldOptions, ModelOptions, SamplingOptions


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
    fields: FieldOptions = field(default_factory=FieldOptions)  # which columns are the prompt, the answer, ...

    def __post_init__(self):
        check_types(self)
        if not self.models:
            raise OpcdError("give at least one --model (a Hugging Face id or a local directory)")
        check_seed(self.seed)
        if (self.data is None) == (self.env is None):
            raise OpcdError("give --data (rows with answers) or --env (a game to play), one of the two")
        at_least("games", self.games, 1)
        at_least("max_turns", self.max_turns, 1)
        if self.env is not None and (self.ood_data is not None or self.best is not None or self.limit is not None):
            raise OpcdError("--ood-data, --best and --limit score datasets; with --env, use --games")
        choice("context_as", self.context_as, CONTEXT_AS)
        choice("verifier", self.verifier, VERIFIERS)
        at_least("batch_size", self.batch_size, 1)
        if self.limit is not None:
            at_least("limit", self.limit, 1)
        if self.best is not None:
            at_least("best", self.best, 1)
        choice("sampler", self.sampler, SAMPLERS)
        fraction("vllm_memory", self.vllm_memory)
        if self.sampling.temperature == 0 and self.sampling.n > 1:
            raise OpcdError("greedy decoding (temperature 0) gives one answer; set --temperature above 0 to draw several samples")
        self.fields.check_splits({"split": {"--data": self.data, "--ood-data": self.ood_data}})


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
    fields: FieldOptions = field(default_factory=FieldOptions)  # which columns are the prompt, the answer, ...

    def __post_init__(self):
        check_types(self)
        if not self.output.strip():
            raise OpcdError("--output is empty; give the experience file to write (e.g. exp.txt)")
        check_seed(self.seed)
        if self.env is not None:
            if self.data is not None or self.val is not None:
                raise OpcdError("give --data and --val (problems) or --env (a game to play), not both")
            if self.model is None:
                raise OpcdError("--env needs --model: the model that plays and extracts")
            for name in ("max_turns", "train_games", "val_games"):
                at_least(name, getattr(self, name), 1)
        elif (self.model is None) != (self.data is None) or (self.model is None) != (self.val is None):
            raise OpcdError("give --model, --data and --val together (or none of them to run the toy world)")
        choice("context_as", self.context_as, CONTEXT_AS)
        choice("verifier", self.verifier, VERIFIERS)
        choice("sampler", self.sampler, SAMPLERS)
        fraction("vllm_memory", self.vllm_memory)
        for name in ("rounds", "attempts", "traces_per_prompt", "token_budget", "batch_size", "extract_max_new_tokens"):
            at_least(name, getattr(self, name), 1)
        self.fields.check_splits({"split": {"--data": self.data}, "eval_split": {"--val": self.val}})
