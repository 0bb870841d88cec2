"""Bad input through the real command line: one line on stderr, exit code 2, no traceback, nothing written.

Every case runs ``python -m opcd_cli ...`` in its own empty working folder (two at a time, once per session),
and is then checked on its own: the exit code, a short stderr naming the problem, no traceback, an empty stdout,
and the working folder and the shared inputs exactly as they were. Most cases fail before any model loads. A case
runs in a forked child of a warm interpreter that has imported the commands (``warm_cli.py``: the same
``python -m opcd_cli``, without 3 s of imports each); a case that sets environment variables a module reads when
it is imported runs in a new interpreter, as a user's shell would start it. To add one, append a ``Case`` to
``CASES``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import cached_dataset, make_tiny_model, tree, write_jsonl
from warm_cli import WarmCLI, run_fresh

@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # {placeholders} name files of the `inputs` fixture
    message: str  # a fragment of the one error line
    env: dict = field(default_factory=dict)  # None removes a variable
    stdin: bytes = b""
    seconds: float = 60.0  # the case must fail within this
    fresh: bool | None = None  # a new interpreter (default: when the case sets environment variables, which a
    # module may read when it is imported); False for variables opcd reads as it runs


DISTILL = ("distill", "--student", "{student}", "--data", "{train}", "--context", "{context}", "--steps", "1",
           "--batch-size", "2", "--topk", "4", "--max-new-tokens", "2", "-o", "run")
GAMES = ("distill", "--student", "{student}", "--env", "doors", "--context", "{context}", "--steps", "1",
         "--batch-size", "2", "--topk", "4", "--max-new-tokens", "2", "-o", "run")
EXTRACT = ("extract", "--model", "{student}", "--data", "{answered}", "--val", "{answered}", "--rounds", "1",
           "--max-new-tokens", "2", "-o", "exp.txt")


def distill(*extra, **changes) -> tuple[str, ...]:
    """The distill command on the tiny model, with flags changed (``--context=...``) and flags added."""
    args = list(DISTILL)
    for flag, value in changes.items():
        args[args.index("--" + flag.replace("_", "-")) + 1] = value
    return tuple(args) + extra


def games(*extra, **changes) -> tuple[str, ...]:
    """``opcd distill --env doors`` on the tiny model, with flags changed and added."""
    args = list(GAMES)
    for flag, value in changes.items():
        args[args.index("--" + flag.replace("_", "-")) + 1] = value
    return tuple(args) + extra


def extract(*extra, **changes) -> tuple[str, ...]:
    args = list(EXTRACT)
    for flag, value in changes.items():
        args[args.index("--" + flag.replace("_", "-")) + 1] = value
    return tuple(args) + extra


CASES = [
    # security: no model code runs unless asked with a real boolean; no pickled weights by default
    *[Case(f"remote code as {spelling!r}", ("distill", "--recipe", "{recipe_" + key + "}"),
           f"loading.trust_remote_code must be true or false (a boolean, not a string or a number); got {spelling!r}")
      for key, spelling in (("false", "false"), ("no", "no"), ("zero", 0), ("zero_text", "0"))],
    Case("remote code refused", distill(student="{evil}"), "needs its own Python code"),
    Case("pickled weights", distill(student="{bin_model}"), "has only pickled weights"),
    Case("pickled code even when allowed", distill("--allow-bin-weights", student="{pickle_bomb}"),
         "Weights only load failed"),
    # one-line errors instead of tracebacks
    Case("latin-1 on stdin", distill(context="-"), "standard input is not UTF-8", stdin="caf\xe9\n".encode("latin-1")),
    Case("binary on stdin", distill(context="-"), "standard input is not UTF-8", stdin=b"\xff\xfe\x00\x00"),
    Case("output .", distill("-o", "."), "names the current folder"),
    Case("output /", distill("-o", "/"), "names the root folder"),
    Case("output in /proc", distill("-o", "/proc/x"), "cannot write"),
    Case("output empty", distill("-o", ""), "--output-dir is empty"),
    Case("weight decay nan", distill("--weight-decay", "nan"), "weight_decay must be a finite number"),
    Case("lr inf", distill("--lr", "inf"), "lr must be a finite number"),
    Case("temperature nan", distill("--temperature", "nan"), "temperature must be a finite number"),
    Case("template not UTF-8", extract("--template", "{latin1}"), "is not UTF-8 text"),
    Case("experience not UTF-8", extract("--experience", "{latin1}"), "is not UTF-8 text"),
    Case("extract over a folder", extract("--overwrite", "-o", "{folder}"), "is in the way of the experience file"),
    Case("triton on a CPU", distill("--kernel", "triton"), "Triton's interpreter", env={"TRITON_INTERPRET": None}),
    Case("OPCD_KERNEL=triton on a CPU", distill(), "Triton's interpreter",
         env={"TRITON_INTERPRET": None, "OPCD_KERNEL": "triton"}),
    Case("toy template without traces", ("extract", "--template", "{no_traces}"), "has no {traces} placeholder"),
    # caught before training, not after
    Case("bad verifier in eval rows", distill("--eval-data", "{bad_verifier}"), "unknown verifier 'regex'"),
    # accepted silently before
    Case("unknown role", distill(data="{tool_role}"), "has role 'tool'"),
    Case("system in the middle", distill(data="{late_system}"), "only the first message may be one"),
    Case("blank lines only", distill(data="{blank}"), "has no rows"),
    Case("prompt types differ", distill(data="{mixed_types}"), "line 2: `prompt` must be a string; got a number"),
    Case("prompt a list", distill(data="{list_prompt}"), "`prompt` must be a string; got a list"),
    Case("prompt empty", distill(data="{empty_prompt}"), "`prompt` is empty"),
    Case("line numbers past blank lines", distill(data="{late_bad_row}"), "line 4 has no `prompt` or `messages`"),
    Case("empty JSON list", distill(data="{empty_list}"), "has no rows"),
    Case("context is a folder", distill(context="{folder}"), "is a directory"),
    Case("save every more than steps", distill("--save-every", "5"), "save_every 5 is more than the 1 steps"),
    Case("eval best without checkpoints", ("eval", "--model", "{finished_run}", "--data", "{answered}", "--best", "3"),
         "has none (it was trained without --save-every)"),
    Case("toy eval data missing", ("distill", "--eval-data", "missing.jsonl"), "eval data file missing.jsonl does not exist"),
    Case("toy OOD data missing", ("distill", "--ood-data", "missing.jsonl"), "OOD data file missing.jsonl does not exist"),
    Case("toy template missing", ("extract", "--template", "missing.txt"), "template file missing.txt does not exist"),
    Case("unknown hub id, no network", distill(student="someone/no-such-model"), "cannot be reached",
         env={"HF_HUB_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"}, seconds=20),
    Case("unknown hub id, offline", distill(student="someone/no-such-model"), "HF_HUB_OFFLINE is set", seconds=20),
    Case("huge context", distill(context="{huge_context}"), "exceeds", seconds=40),
    Case("output dir names a file", distill("-o", "{answered}"), "is a file"),
    # chat templates
    Case("template kwargs not JSON", distill("--chat-template-kwargs", "enable_thinking=false"),
         "--chat-template-kwargs must be a JSON object"),
    Case("template kwargs a list", ("eval", "--model", "{student}", "--data", "{test}", "--chat-template-kwargs", "[1]"),
         "--chat-template-kwargs must be a JSON object"),
    # long runs: LoRA students and --resume
    Case("lora rank 0", distill("--lora-rank", "0"), "lora_rank must be at least 1 (leave it out to train every weight)"),
    Case("lora rank negative", distill("--lora-rank", "-4"), "lora_rank must be at least 1"),
    Case("lora targets match nothing", distill("--lora-rank", "4", "--lora-targets", "attn_out"),
         "--lora-targets attn_out: Target modules"),
    Case("resume a missing folder", ("distill", "--resume", "nowhere.partial"), "--resume nowhere.partial: no such run folder"),
    Case("resume an unreadable config", ("distill", "--resume", "{unreadable_run}"), "cannot read its opcd_config.json"),
    Case("resume a run without state", ("distill", "--resume", "{stateless_run}"), "holds no training state"),
    Case("resume with another output", ("distill", "--resume", "{stateless_run}", "-o", "elsewhere"),
         "in its own folder"),
    Case("resume with --overwrite", ("distill", "--resume", "{stateless_run}", "--overwrite"),
         "cannot be combined with --overwrite"),
    Case("resume with other settings", ("distill", "--resume", "{stateless_run}", "--lr", "0.5", "--steps", "9"),
         "these flags differ from them: --lr (only --steps, --save-every, --show-prompts, --teacher-sharding, --gradient-checkpointing, --teacher-prefix-cache, --micro-batch-tokens, --min-topk-mass and --stop-on-escape may change; --trust-remote-code, --allow-bin-weights and --report-to are given anew each time)"),
    # the loss and its guard
    Case("renorm and tail", distill("--topk-renorm", "--topk-tail"), "--topk-renorm and --topk-tail each make"),
    Case("unknown support", distill("--topk-support", "teacher"), "topk_support must be one of student, union"),
    Case("top-k mass threshold of 1.5", distill("--min-topk-mass", "1.5"), "min_topk_mass must be a fraction in [0, 1)"),
    Case("anchor off-policy", distill("--anchor-weight", "1", "--mode", "off-policy"),
         "the in-context anchor scores the student's own rollouts"),
    Case("user-prefix regulariser without user-prefix", distill("--no-user-prefix-consistency"),
         "--no-user-prefix-consistency only acts with --context-as user-prefix"),
    Case("anchor schedule without anchor", distill("--anchor-start", "11"),
         "--anchor-start and --anchor-warmup schedule the in-context anchor; give --anchor-weight too"),
    # the objectives, several samples per prompt, the reward
    Case("unknown objective", distill("--objective", "kl"), "objective must be one of topk-reverse-kl, sampled-token"),
    Case("jsd beta without jsd", distill("--jsd-beta", "0.2"), "--jsd-beta sets the mixture of --objective jsd"),
    Case("jsd beta of 1.5", distill("--objective", "jsd", "--jsd-beta", "1.5"), "jsd_beta must be in [0, 1]"),
    Case("union with sampled-token", distill("--objective", "sampled-token", "--topk-support", "union"),
         "--topk-support union shapes or watches the top-k reverse KL over the student's top-k, and --objective "
         "sampled-token reads only the sampled token"),
    Case("tail with jsd", distill("--objective", "jsd", "--topk-tail"),
         "--topk-tail shapes or watches the top-k reverse KL over the student's top-k, and --objective jsd is over "
         "the full vocabulary"),
    Case("renorm with forward kl", distill("--objective", "topk-forward-kl", "--topk-renorm"), "drop --topk-renorm"),
    Case("escape guard with sampled-token", distill("--objective", "sampled-token", "--stop-on-escape"),
         "drop --stop-on-escape or use --objective topk-reverse-kl"),
    Case("objective off-policy", distill("--objective", "jsd", "--mode", "off-policy"),
         "--objective jsd is an on-policy objective"),
    Case("samples per prompt off-policy", distill("--samples-per-prompt", "4", "--mode", "off-policy"),
         "--samples-per-prompt samples the student several times per prompt"),
    Case("no samples per prompt", distill("--samples-per-prompt", "0"), "samples_per_prompt must be a number of at least 1"),
    Case("reward off-policy", distill("--reward-weight", "1", "--mode", "off-policy"),
         "--reward-weight rewards the student's own samples"),
    Case("reward without a group", distill("--reward-weight", "1"), "give --samples-per-prompt 2 or more"),
    Case("reward std without reward", distill("--reward-std"), "--reward-std scales the reward's advantage"),
    Case("reward without answers", distill("--reward-weight", "1", "--samples-per-prompt", "2", data="{unanswered}"),
         "has no `answer`; --reward-weight scores every sample with the verifier"),
    # games
    Case("unknown environment", ("eval", "--model", "{student}", "--env", "chess"),
         "--env chess: no such environment; give one of doors, frozenlake, textarena:ID (a TextArena single-player game) or package.module:Class"),
    Case("distill: unknown environment", games("--env", "chess"), "--env chess: no such environment"),
    Case("distill: environment class without the interface", games("--env", "collections:OrderedDict"),
         "OrderedDict does not implement the environment interface"),
    Case("distill: zero turns", games("--max-turns", "0"), "max_turns must be a number of at least 1; got 0"),
    Case("distill: negative evaluation games", games("--eval-games", "-1"), "eval_games must be a number of at least 0"),
    Case("distill: an environment that raises", games("--env", "test_games:Exploding"),
         "the environment test_games:Exploding failed at step: RuntimeError: the lake melted",
         env={"PYTHONPATH": str(Path(__file__).parent)}, fresh=False),
    Case("distill: games and rows", games("--data", "{train}"), "give --data (prompts) or --env (a game to play), not both"),
    Case("extract: unknown environment", ("extract", "--model", "{student}", "--env", "chess", "-o", "exp.txt"),
         "--env chess: no such environment"),
    Case("extract: games and problems", extract("--env", "doors"), "give --data and --val (problems) or --env"),
    Case("extract: no validation games", ("extract", "--model", "{student}", "--env", "doors", "--val-games", "0"),
         "val_games must be a number of at least 1; got 0"),
    Case("distill: games without a context", ("distill", "--student", "{student}", "--env", "doors", "-o", "run"),
         "nothing to distil: give --context FILE (or -) for the games"),
    Case("distill: games out of distribution without their context", games("--ood-env-options", '{{"doors": 2}}'),
         "games out of distribution need --env, --ood-env-options and --ood-context together"),
    Case("environment class without the interface", ("eval", "--model", "{student}", "--env", "collections:OrderedDict"),
         "OrderedDict does not implement the environment interface"),
    Case("zero turns", ("eval", "--model", "{student}", "--env", "frozenlake", "--max-turns", "0"),
         "max_turns must be a number of at least 1; got 0"),
    # micro-batches by token budget
    Case("negative token budget", distill("--micro-batch-tokens", "-1"), "micro_batch_tokens must be a number of at least 0; got -1"),
    Case("token budget below the longest sequence", distill("--micro-batch-tokens", "3"),
         "--micro-batch-tokens 3 cannot hold the longest sequence a micro-batch may get"),
    # several processes (torchrun's own cases are in test_distributed.py)
    Case("unknown teacher sharding", distill("--teacher-sharding", "everywhere"),
         "teacher_sharding must be one of replicate, shard"),
    Case("world size without a dry run", distill("--world-size", "8"), "--world-size plans a launch with --dry-run"),
    Case("world size zero", distill("--dry-run", "--world-size", "0"), "--world-size must be at least 1; got 0"),
    Case("bad WORLD_SIZE", distill(), "WORLD_SIZE, RANK and LOCAL_RANK must be integers",
         env={"WORLD_SIZE": "two", "RANK": "0"}),
    Case("eval under torchrun", ("eval", "--model", "{student}", "--data", "{test}"),
         "opcd eval runs as one process; start it without torchrun", env={"WORLD_SIZE": "2", "RANK": "1"}),
    # a run folder never widens what runs: its config edited to trust the model's code (the model's code would
    # write the marker that test_no_case_ran_model_code_or_changed_the_inputs looks for)
    Case("resume a config edited to trust remote code", ("distill", "--resume", "{resume_evil}", "--steps", "2"),
         "needs its own Python code"),
    Case("resume a config edited to unpickle weights", ("distill", "--resume", "{resume_pickled}", "--steps", "2"),
         "has only pickled weights"),
    Case("resume a run of a game class of one's own", ("distill", "--resume", "{resume_game_class}", "--steps", "2"),
         "a class of your own (Python code); a run folder never runs code by itself"),
    # resume is all or nothing: the run is left exactly as it was (the shared inputs are checked after)
    Case("resume a truncated state", ("distill", "--resume", "{resume_truncated}", "--steps", "2"),
         "cannot read the training state"),
    Case("resume with changed data", ("distill", "--resume", "{resume_changed}", "--steps", "2"),
         "has changed since resume-changed started"),
    Case("resume a config holding a list", ("distill", "--resume", "{list_run}"), "its opcd_config.json holds list"),
    Case("resume a config edited to other values", ("distill", "--resume", "{resume_edited}", "--steps", "2"),
         "was edited since its training state was saved (lr: 1e-06 then, 0.5 now)"),
    # an output never eats an input or a stranger's folder
    Case("output is the student", distill("--overwrite", "--lora-rank", "4", "-o", "{student}"),
         "is --student"),
    Case("output inside the student", distill("-o", "{student}/run"), "lies inside --student"),
    Case("output holds the data", distill("--overwrite", "-o", "{toy_folder}"), "holds --data"),
    Case("rollouts to be written inside the output", distill("--mode", "off-policy", "--rollouts", "run/rollouts"),
         "holds --rollouts"),
    Case("output is the rollouts", distill("--mode", "off-policy", "--rollouts", "{folder}", "--overwrite",
                                           "-o", "{folder}"), "is --rollouts"),
    Case("overwrite a folder with a stray marker", distill("--overwrite", "-o", "{stray_marker}"),
         "is not empty and not an opcd run"),
    Case("output a symbolic link", distill("--overwrite", "-o", "{link}"), "is a symbolic link"),
    Case("output a dangling link", distill("-o", "{dangling}"), "which does not exist"),
    Case("extract output is its data", extract("--overwrite", "-o", "{answered}"), "is --data"),
    # what the user wrote is what the run uses
    Case("template kwargs the template does not read", distill("--chat-template-kwargs", '{{"enable_thinking": false}}'),
         "does not read 'enable_thinking'"),
    Case("environment option as a string", ("eval", "--model", "{student}", "--env", "frozenlake", "--env-options",
                                            '{{"slippery": "false"}}'), "option slippery must be true or false"),
    Case("ema decay without the ema teacher", distill("--ema-decay", "0.5"), "--ema-decay only acts with --teacher-kind ema"),
    Case("vllm eager without vllm", distill("--vllm-eager"), "--vllm-eager only acts with --sampler vllm"),
    Case("max turns without a game", distill("--max-turns", "3"), "--max-turns only acts with --env"),
    Case("off-policy loss on-policy", distill("--off-policy-loss", "sft"), "--off-policy-loss only acts with --mode off-policy"),
    # LoRA on a tied output layer; sizes that cannot fit
    Case("lora on the tied output layer", distill("--lora-rank", "4", "--lora-targets", "lm_head,q_proj"),
         "output layer is its input embeddings (tied"),
    Case("lora on the tied input embeddings", distill("--lora-rank", "4", "--lora-targets", "embed_tokens"),
         "output layer is its input embeddings (tied"),
    Case("lora rank above the layers' width", distill("--lora-rank", "4096"), "is above the width of"),
    Case("batch far above the rows", distill("--batch-size", "100000"), "is more than the 8 rows"),
    Case("seed past 64 bits", distill("--seed", str(2**70)), "seed must be a whole number from 0 to"),
    # every late failure is one line
    Case("reward that is not a number", ("eval", "--model", "{student}", "--env", "test_games:TextReward",
                                         "--games", "1", "--max-new-tokens", "2"),
         "returned the reward '0.0'; a reward must be a number", env={"PYTHONPATH": str(Path(__file__).parent)}, fresh=False),
    Case("game over as text", ("eval", "--model", "{student}", "--env", "test_games:TextDone", "--games", "1",
                               "--max-new-tokens", "2"), "returned done = 'no'; it must be true or false",
         env={"PYTHONPATH": str(Path(__file__).parent)}, fresh=False),
    Case("model config holding a list", distill(student="{list_config}"), "cannot load the tokenizer of"),
    Case("dry run on a config holding a list", distill("--dry-run", student="{list_config}"), "cannot read the config of"),
    Case("plot lines that are not steps", ("plot", "{not_steps}", "-o", "plot.png"), "not a step's metrics"),
    Case("plot lines not UTF-8", ("plot", "{latin1_metrics}", "-o", "plot.png"), "is not UTF-8 text"),
    Case("plot into a folder it cannot write", ("plot", "{good_metrics}", "-o", "/proc/plot.png"), "cannot write"),
    Case("wandb mode unknown", distill("--report-to", "wandb"), "WANDB_MODE='sometimes' is not a mode wandb knows",
         env={"WANDB_MODE": "sometimes"}, fresh=False),
    Case("wandb online without a key", distill("--report-to", "wandb"), "needs an API key",
         env={"WANDB_MODE": "online", "WANDB_API_KEY": None, "NETRC": "/nonexistent/netrc"}, fresh=False),
    Case("wandb online without a network", distill("--report-to", "wandb"), "cannot be reached",
         env={"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"},
         seconds=20, fresh=False),
    # rows mapped by the user: a column the row lacks, a path that leads nowhere, two sources of one field
    Case("prompt template names a missing column", ("eval", "--model", "{student}", "--data", "{mcq}",
                                                    "--prompt-template", "{{questoin}}", "--answer-template", "{{cop}}"),
         "line 1: --prompt-template names the column 'questoin', which the row does not have (its columns: question, "),
    Case("dotted path leads nowhere", ("eval", "--model", "{student}", "--data", "{verl}", "--answer-field",
                                       "reward_model.truth"), "line 1: --answer-field reward_model.truth: "
         "reward_model has no 'truth' (its keys: ground_truth)"),
    Case("choice number past the letters", ("eval", "--model", "{student}", "--data", "{mcq}", "--prompt-template",
                                            "{{question}}", "--answer-template", "{{opa:letter}}"),
         "--answer-template '{opa:letter}' cannot be filled from the row"),
    Case("prompt from a column and a template", ("eval", "--model", "{student}", "--data", "{mcq}", "--prompt-field",
                                                 "question", "--prompt-template", "{{question}}"),
         "--prompt-field and --prompt-template both say where the prompt comes from; give one"),
    Case("a verl chat that is not one", ("eval", "--model", "{student}", "--data", "{verl_bad}"),
         "line 1: every message needs a string `role` and `content`"),
    # datasets by name (hf:): a malformed name, a split it does not have, a broken cache, not cached
    Case("dataset name malformed", distill(data="hf:acme/rows/extra"), "hf:acme/rows/extra is not a dataset name: "
         "write hf:ORG/NAME, hf:ORG/NAME:CONFIG or hf:FOLDER"),
    Case("dataset split unknown", distill("--split", "dev", data="hf:acme/rows"),
         "data hf:acme/rows has no split 'dev'; its splits are train, test: give one with --split",
         env={"HF_DATASETS_CACHE": "{hub_cache}", "HF_DATASETS_OFFLINE": "1"}),
    Case("dataset cache broken", ("eval", "--model", "{student}", "--data", "hf:acme/rows"),
         "cannot read data hf:acme/rows: ", env={"HF_DATASETS_CACHE": "{broken_hub_cache}", "HF_DATASETS_OFFLINE": "1"}),
    Case("dataset not cached, offline", distill(data="hf:acme/missing"), "hf:acme/missing is not in the Hugging Face "
         "datasets cache", env={"HF_DATASETS_CACHE": "{hub_cache}", "HF_DATASETS_OFFLINE": "1"}, seconds=20),
    Case("dataset not cached, no network", distill(data="hf:acme/missing"), "and the hub cannot be reached",
         env={"HF_DATASETS_CACHE": "{hub_cache}", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": None,
              "HF_ENDPOINT": "http://127.0.0.1:9"}, seconds=20),
    Case("split of a file", distill("--split", "test"), "--split test chooses the split of a dataset by name"),
    # TextArena games: an id it does not have (the close single-player ones named), a game for two players
    Case("textarena id unknown", ("eval", "--model", "{student}", "--env", "textarena:FrozenLak-v0"),
         "TextArena has no game 'FrozenLak-v0'; close single-player ids: FrozenLake-v0"),
    Case("textarena two-player game", games("--env", "textarena:TicTacToe-v0"),
         "textarena:TicTacToe-v0 is a game for several players; opcd plays single-player games"),
]


def bomb(marker: Path):
    """A pickle that, unpickled by the full unpickler, writes ``marker``."""

    class Bomb:
        def __reduce__(self):
            return (Path.write_text, (marker, "pickled code ran"))

    return Bomb()


def evil_model(folder: Path, marker: Path) -> Path:
    """A model whose config's auto_map points at Python code that writes ``marker`` when imported."""
    make_tiny_model(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import Qwen3Config, Qwen3ForCausalLM\n"
        "class EvilConfig(Qwen3Config):\n    model_type = 'evil'\n"
        "class EvilModel(Qwen3ForCausalLM):\n    config_class = EvilConfig\n"
    )
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_student, toy_files_module):
    """Every file the cases name, made once."""
    folder = tmp_path_factory.mktemp("inputs")
    marker = folder / "MARKER"
    files = {"student": tiny_student, **toy_files_module, "marker": marker}
    files["evil"] = evil_model(folder / "evil", marker)
    for key, value in (("false", '"false"'), ("no", '"no"'), ("zero", "0"), ("zero_text", '"0"')):
        recipe = folder / f"remote-{key}.toml"
        recipe.write_text(f'student = "{files["evil"]}"\ndata = "{files["train"]}"\ncontext = "{files["context"]}"\n'
                          f"steps = 1\n[loading]\ntrust_remote_code = {value}\n")
        files[f"recipe_{key}"] = recipe
    from safetensors.torch import load_file

    files["bin_model"] = folder / "bin-model"  # the same weights as a pickle, as older checkpoints ship them
    files["bin_model"].mkdir()
    torch.save(load_file(tiny_student / "model.safetensors"), files["bin_model"] / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (files["bin_model"] / name).write_bytes((tiny_student / name).read_bytes())
    files["pickle_bomb"] = folder / "pickle-bomb"
    files["pickle_bomb"].mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (files["pickle_bomb"] / name).write_bytes((tiny_student / name).read_bytes())
    with open(files["pickle_bomb"] / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": bomb(marker)}, f)
    files["latin1"] = folder / "latin1.txt"
    files["latin1"].write_bytes("- EXPERIENCE ITEM: caf\xe9 {traces}\n".encode("latin-1"))
    files["folder"] = folder / "a-folder"
    files["folder"].mkdir()
    (files["folder"] / "keep.txt").write_text("mine")
    files["no_traces"] = folder / "template.txt"
    files["no_traces"].write_text("Lessons, please.\n")
    files["answered"] = write_jsonl(folder / "answered.jsonl", [{"prompt": "a", "answer": "a"}] * 3)
    files["unanswered"] = write_jsonl(folder / "unanswered.jsonl", [{"prompt": "a"}] * 3)
    files["bad_verifier"] = write_jsonl(folder / "bad-verifier.jsonl", [{"prompt": "a", "answer": "a", "verifier": "regex"}])
    files["tool_role"] = write_jsonl(folder / "tool.jsonl", [{"messages": [{"role": "tool", "content": "x"},
                                                                            {"role": "user", "content": "y"}]}])
    files["late_system"] = write_jsonl(folder / "late-system.jsonl", [{"messages": [
        {"role": "user", "content": "x"}, {"role": "system", "content": "y"}, {"role": "user", "content": "z"}]}])
    files["blank"] = folder / "blank.jsonl"
    files["blank"].write_text("\n  \n\n")
    files["mixed_types"] = write_jsonl(folder / "mixed.jsonl", [{"prompt": "a"}, {"prompt": 5}])
    files["list_prompt"] = write_jsonl(folder / "list.jsonl", [{"prompt": ["a", "b"]}])
    files["empty_prompt"] = write_jsonl(folder / "empty-prompt.jsonl", [{"prompt": "  "}])
    files["mcq"] = write_jsonl(folder / "mcq.jsonl", [{"question": "q", "opa": "x", "opb": "y", "cop": 1}])
    files["verl"] = write_jsonl(folder / "verl.jsonl", [{"prompt": [{"role": "user", "content": "q"}],
                                                         "reward_model": {"ground_truth": "a"}, "data_source": "d"}])
    caches = tmp_path_factory.mktemp("datasets-caches")  # beside the inputs: datasets writes its locks there
    toy = [{"prompt": "q", "answer": "a"}] * 2
    files["hub_cache"], files["broken_hub_cache"] = caches / "cache", caches / "broken"
    for cache in (files["hub_cache"], files["broken_hub_cache"]):
        cached_dataset(cache, "acme/rows", {"train": toy, "test": toy})
    next(files["broken_hub_cache"].glob("acme___rows/*/*/*/rows-train.arrow")).write_bytes(b"not arrow")
    files["verl_bad"] = write_jsonl(folder / "verl-bad.jsonl", [{"prompt": [{"role": "user", "content": 5}],
                                                                 "reward_model": {"ground_truth": "a"}}])
    files["late_bad_row"] = folder / "late-bad.jsonl"
    files["late_bad_row"].write_text('{"prompt": "a"}\n\n\n{"question": "b"}\n')
    files["empty_list"] = folder / "empty.json"
    files["empty_list"].write_text("[]")
    files["finished_run"] = folder / "finished-run"
    files["finished_run"].mkdir()
    (files["finished_run"] / "opcd_config.json").write_text("{}")
    files["unreadable_run"] = folder / "unreadable.partial"
    files["unreadable_run"].mkdir()
    (files["unreadable_run"] / "opcd_config.json").write_text("{not json")
    files["stateless_run"] = folder / "stateless.partial"  # stopped before its first saved state
    files["stateless_run"].mkdir()
    from opcd_cli.config import build_distill_config

    config = build_distill_config({"student": str(tiny_student), "data": str(files["train"]),
                                   "context": str(files["context"]), "output_dir": str(folder / "stateless")})
    (files["stateless_run"] / "opcd_config.json").write_text(json.dumps(config.to_dict()))
    files["huge_context"] = folder / "huge.txt"
    files["huge_context"].write_text("lessons " * 700_000)  # 5.6 MB
    files["toy_folder"] = toy_files_module["train"].parent
    files["stray_marker"] = folder / "stray-marker"  # a user's folder that happens to hold a file of that name
    files["stray_marker"].mkdir()
    (files["stray_marker"] / "opcd_config.json").write_text("{}")
    (files["stray_marker"] / "thesis.tex").write_text("precious")
    files["link"] = folder / "link"
    files["link"].symlink_to(files["folder"])
    files["dangling"] = folder / "dangling"
    files["dangling"].symlink_to(folder / "nowhere")
    files["list_run"] = folder / "list-run.partial"
    files["list_run"].mkdir()
    (files["list_run"] / "opcd_config.json").write_text("[]")
    files["list_config"] = folder / "list-config"
    shutil.copytree(tiny_student, files["list_config"])
    (files["list_config"] / "config.json").write_text("[]")
    metrics = folder / "metrics"
    metrics.mkdir()
    files["not_steps"] = metrics / "not-steps.jsonl"
    files["not_steps"].write_text('{"step": 1, "loss": 0.5}\n[1, 2]\n')
    files["latin1_metrics"] = metrics / "latin1.jsonl"
    files["latin1_metrics"].write_bytes('{"step": 1, "note": "caf\xe9"}\n'.encode("latin-1"))
    files["good_metrics"] = metrics / "good.jsonl"
    files["good_metrics"].write_text('{"step": 1, "loss": 0.5}\n')
    files |= resumable_runs(folder / "runs", files)
    return files


def resumable_runs(folder: Path, files: dict) -> dict:
    """A finished one-step run of the tiny student with its state, copied and spoilt for each resume case."""
    from opcd_cli.cli import main

    run = folder / "run"
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in DISTILL]
    assert main([*args[:-1], str(run), "--save-every", "1"]) == 0, "the run the resume cases start from"
    runs = {}
    for name in ("resume-evil", "resume-pickled", "resume-game-class", "resume-truncated", "resume-changed",
                 "resume-edited"):
        runs[name.replace("-", "_")] = shutil.copytree(run, folder / name)
    for name, model, permission in (("resume_evil", "evil", "trust_remote_code"),
                                    ("resume_pickled", "bin_model", "allow_bin_weights")):
        config_file = runs[name] / "opcd_config.json"
        config = json.loads(config_file.read_text())
        config["student"], config["loading"][permission] = str(files[model]), True
        config_file.write_text(json.dumps(config))
    config_file = runs["resume_game_class"] / "opcd_config.json"
    config = json.loads(config_file.read_text())
    config.update(env="test_games:Corridor", data=None)
    config_file.write_text(json.dumps(config))
    config_file = runs["resume_edited"] / "opcd_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"lr": 0.5}))
    weights = runs["resume_truncated"] / "state" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    recorded = runs["resume_changed"] / "data" / "train.jsonl"
    recorded.write_text(recorded.read_text() + '{"prompt": "a row the data file no longer has"}\n')
    shutil.rmtree(run)
    return runs


@pytest.fixture(scope="module")
def toy_files_module(tmp_path_factory):
    """The `toy_files` of conftest, made once for the module."""
    from opcd_cli.toy import world

    splits = world.splits("shift", train=8, val=4, test=6, ood_per_kind=1)
    folder = tmp_path_factory.mktemp("toy-inputs")
    (folder / "context.txt").write_text(splits.context + "\n")
    return {"train": write_jsonl(folder / "train.jsonl", splits.train),
            "test": write_jsonl(folder / "test.jsonl", splits.test), "context": folder / "context.txt"}


def run_case(case: Case, inputs: dict, work: Path, warm) -> dict:
    env = dict(os.environ)
    for key, value in case.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    for key, value in case.env.items():  # {placeholders} name files of the `inputs` fixture
        if value is not None:
            env[key] = value.format(**{k: str(v) for k, v in inputs.items()})
    args = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in case.args]
    before = tree(work)
    fresh = bool(case.env) if case.fresh is None else case.fresh  # a changed environment may matter at import
    run = run_fresh if fresh else warm.run
    got = run(args, work, env, case.stdin, case.seconds + 30)
    return got | {"timeout": got["code"] == "timeout", "tree_changed": tree(work) != before}


@pytest.fixture(scope="module")
def results(inputs, tmp_path_factory):
    """Every case's outcome, the cases run two at a time; the shared inputs checked before and after."""
    import queue

    shared_before = tree(inputs["folder"].parent)
    works = {case.name: tmp_path_factory.mktemp("case") for case in CASES}
    servers = queue.Queue()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for server in pool.map(lambda _: WarmCLI(), range(2)):
            servers.put(server)

        def one(case):
            server = servers.get()
            try:
                return case.name, run_case(case, inputs, works[case.name], server)
            finally:
                servers.put(server)

        try:
            outcomes = dict(pool.map(one, CASES))
        finally:
            while not servers.empty():
                servers.get().close()
    return outcomes, shared_before, tree(inputs["folder"].parent)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case, results):
    outcomes, _, _ = results
    got = outcomes[case.name]
    assert not got.get("timeout"), f"{case.name}: still running after {case.seconds + 30} s"
    lines = got["stderr"].strip().splitlines()
    assert got["code"] == 2, (case.name, got["stderr"][-2000:])
    assert "Traceback" not in got["stderr"] and got["stdout"] == ""
    errors = [line for line in lines if line.startswith("opcd: error:")]
    assert len(errors) == 1 and len(lines) <= 3, lines  # one error line (libraries may print one warning)
    assert case.message in errors[0], errors[0]
    assert not got["tree_changed"], f"{case.name} wrote into its working folder"
    assert got["seconds"] < case.seconds, f"{case.name} took {got['seconds']:.0f} s"


def test_no_case_ran_model_code_or_changed_the_inputs(results, inputs):
    """Every shared input as it was, to the file and its time; the runs the resume cases refused too (only the
    folder that holds them changed: each resume takes its lock beside its run, and gives it back)."""
    _, before, after = results
    assert not inputs["marker"].exists(), inputs["marker"].read_text()
    assert before.keys() == after.keys()
    assert {k: v for k, v in before.items() if k != "runs"} == {k: v for k, v in after.items() if k != "runs"}
