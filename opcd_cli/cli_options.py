"""The flags of the ``opcd`` commands that several commands share, each declared once (its help, its help
panel, its accepted values), and the names of the panels ``--help`` groups the flags into."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .config import CONTEXT_AS, DTYPES, SAMPLERS, VERIFIERS

# the help panels, in the order a run meets them
MODELS = "Models"
DATA = "Data and context"
GAMES = "Games (instead of data)"
LOSS = "Loss"
TRAINING = "Training"
SAMPLING = "Sampling"
EVALUATION = "Evaluation"
OUTPUT = "Output and resume"
SCALING = "Scaling out"
LORA = "LoRA"
WORK = "The work"  # opcd extract's rounds


def one_of(choices) -> str:
    """A choice flag's metavar: its accepted values, ``[on-policy|off-policy]``."""
    return "[" + "|".join(choices) + "]"


def names(choices) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def option(*flags: str, help: str, panel: str, choices=None):
    """A flag's declaration for an ``Annotated`` type (its default is the parameter's)."""
    return typer.Option(*flags, help=help, rich_help_panel=panel, metavar=one_of(choices) if choices else None)


def flag(default, *flags: str, help: str, panel: str, choices=None):
    """A flag declared where it is used, with its ``default``."""
    return typer.Option(default, *flags, help=help, rich_help_panel=panel, metavar=one_of(choices) if choices else None)


Recipe = Annotated[Optional[str], option(
    help="Recipe with default settings (a TOML file, or a built-in name such as toy-shift or toy-codes-extract); "
         "flags override it.", panel=OUTPUT)]
Context = Annotated[Optional[str], option(
    help="Context file (- for stdin): what to distil, or to score with in front; rows may carry their own.", panel=DATA)]
ContextAs = Annotated[Optional[str], option(
    help="Where the context goes: system (a system message) or user-prefix (before the user turn).", panel=DATA,
    choices=CONTEXT_AS)]
Verifier = Annotated[Optional[str], option(
    help="How an answer is checked (auto: the row's own `verifier`, else exact).", panel=EVALUATION, choices=VERIFIERS)]
Env = Annotated[Optional[str], option(
    help="Instead of data, a game played turn by turn: frozenlake, doors, textarena:ID (a TextArena single-player "
         "game, such as textarena:FrozenLake-v0-raw) or package.module:Class (see the README's Games).", panel=GAMES)]
EnvOptions = Annotated[Optional[str], option(help='The game\'s options, as JSON, e.g. \'{"size": 4}\'.', panel=GAMES)]
MaxTurns = Annotated[Optional[int], option(help="With --env: most replies a game gets (default 10).", panel=GAMES)]
Temperature = Annotated[Optional[float], option(help="Sampling temperature (0: greedy).", panel=SAMPLING)]
TopP = Annotated[Optional[float], option(help="Nucleus sampling threshold.", panel=SAMPLING)]
MaxNewTokens = Annotated[Optional[int], option(help="Longest response sampled.", panel=SAMPLING)]
Seed = Annotated[Optional[int], option(help="Seed for the order of the prompts and for sampling.", panel=SAMPLING)]
Sampler = Annotated[Optional[str], option(help="The generation engine (hf: Hugging Face generate).", panel=SAMPLING,
                                          choices=SAMPLERS)]
VllmMemory = Annotated[Optional[float], option(
    help="Share of GPU memory (host memory on a CPU) for the vLLM engine.", panel=SAMPLING)]
VllmEager = Annotated[Optional[bool], option(
    "--vllm-eager", help="Start vLLM without compilation or graphs: faster to start, slower to sample.", panel=SAMPLING)]
ChatTemplateKwargs = Annotated[Optional[str], option(
    help='Keyword arguments for the chat templates, as JSON, e.g. \'{"enable_thinking": false}\' (both views get the '
         'same).', panel=MODELS)]
Dtype = Annotated[Optional[str], option(help="Compute dtype (auto: bf16 on a GPU, fp32 on a CPU).", panel=MODELS,
                                        choices=DTYPES)]
TrustRemoteCode = Annotated[Optional[bool], option(
    "--trust-remote-code", help="Run a model's own Python code (its config's auto_map); only for code you trust.",
    panel=MODELS)]
AllowBinWeights = Annotated[Optional[bool], option(
    "--allow-bin-weights", help="Also load pickled *.bin weights (through PyTorch's weights-only unpickler); "
                                "safetensors only by default.", panel=MODELS)]
Overwrite = Annotated[Optional[bool], option("--overwrite", help="Replace an existing output.", panel=OUTPUT)]
JsonOutput = Annotated[bool, option(
    "--json", help="Print one JSON object on stdout at the end (everything else goes to stderr).", panel=OUTPUT)]
PromptField = Annotated[Optional[str], option(
    help="The column holding the prompt, for rows in no format opcd knows (a dotted path: problem.text).", panel=DATA)]
MessagesField = Annotated[Optional[str], option(
    help="The column holding the chat (a list of {role, content}), as a dotted path.", panel=DATA)]
ContextField = Annotated[Optional[str], option(help="The column holding each row's own context.", panel=DATA)]
AnswerField = Annotated[Optional[str], option(
    help="The column holding the answer (a dotted path: reward_model.ground_truth).", panel=DATA)]
PromptTemplate = Annotated[Optional[str], option(
    help="The prompt written from the row's columns, as a Python format string: '{question}\\nA) {opa}\\nB) {opb}'.",
    panel=DATA)]
Split = Annotated[Optional[str], option(
    help="The split of a dataset by name (hf:ORG/NAME) to read; default: train for training rows, test or "
         "validation for scored rows, else its only split.", panel=DATA)]
EvalSplit = Annotated[Optional[str], option(
    help="The split of the evaluation rows named hf:ORG/NAME (default test, else validation, else the only one).",
    panel=DATA)]
AnswerTemplate = Annotated[Optional[str], option(
    help="The answer written from the row's columns: '{answer}', or '{cop:letter}' (0 is A; :letter1, 1 is A).",
    panel=DATA)]
