"""The ``opcd`` command: parses flags into a config, calls one function, prints the result.

    opcd distill                      # the built-in toy world, on a CPU, in about a minute
    opcd distill --student Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B --context exp.txt --data train.jsonl
    opcd eval --model runs/my-run --data test.jsonl --context exp.txt --json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .config import (
    CONTEXT_AS, DTYPES, KERNELS, REPORT_TO, SAMPLERS, TEACHER_SHARDING, VERIFIERS, EvalConfig, ExtractConfig, ModelOptions, SamplingOptions,
    build_distill_config, build_extract_config, parse_json_object, read_recipe, resume_config,
)
from .errors import Interrupted, OpcdError
from .ui import UI, percent, print_json

app = typer.Typer(
    name="opcd",
    help="On-Policy Context Distillation: move what a model knows from its context into its weights.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

JSON_HELP = "Print one JSON object on stdout at the end (everything else goes to stderr)."
TOY_TASKS = ("codes", "shift", "recall", "game")


def names(choices) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def recipe_layers(recipe: str | None, model_key: str, model_flag: str | None, toy_recipe: str, cls=None):
    """The settings layers under the flags: ``--recipe``, on top of the built-in ``toy_recipe`` when no model is
    given anywhere (neither by flag nor by the recipe)."""
    chosen = read_recipe(recipe, cls) if recipe else {}
    if model_flag is not None or model_key in chosen:
        return [chosen]
    return [read_recipe(toy_recipe, cls), chosen]


@app.command()
def distill(
    recipe: Optional[str] = typer.Option(None, help="Recipe with default settings (a TOML file or a built-in name such as toy-shift); flags override it."),
    resume: Optional[str] = typer.Option(None, help="Continue a run from its saved state: its .partial folder, or a finished run with a higher --steps."),
    student: Optional[str] = typer.Option(None, help="Student: Hugging Face id or local folder. Omit to run the toy world."),
    teacher: Optional[str] = typer.Option(None, help="Frozen teacher. Omit for a frozen copy of the student."),
    data: Optional[str] = typer.Option(None, help="Prompts: JSONL, JSON, CSV, Parquet or a saved dataset folder."),
    context: Optional[str] = typer.Option(None, help="Context file to distil (- for stdin); rows may carry their own."),
    context_as: Optional[str] = typer.Option(None, help="system (a system message) or user-prefix (before the user turn)."),
    env: Optional[str] = typer.Option(None, help="Instead of --data, games played turn by turn: frozenlake, doors, or package.module:Class; every reply trains."),
    env_options: Optional[str] = typer.Option(None, help='The game\'s options, as JSON, e.g. \'{"size": 4}\'.'),
    max_turns: Optional[int] = typer.Option(None, help="With --env: most replies a game gets (default 10)."),
    eval_games: Optional[int] = typer.Option(None, help="With --env: games scored before and after training, seeds 0 to N-1 (default 64)."),
    ood_env_options: Optional[str] = typer.Option(None, help="With --env: options of games out of distribution (JSON, over --env-options), played with --ood-context."),
    ood_context: Optional[str] = typer.Option(None, help="With --env: the context of the games out of distribution."),
    toy_task: Optional[str] = typer.Option(None, help=f"Run the toy world's task: {names(TOY_TASKS)} (the built-in recipe toy-TASK)."),
    name: Optional[str] = typer.Option(None, help="Run name for the default output directory (default: the student's)."),
    mode: Optional[str] = typer.Option(None, help="on-policy (OPCD) or off-policy (train on the teacher's own responses)."),
    off_policy_loss: Optional[str] = typer.Option(None, help="Off-policy loss: forward-kl (teacher's top-k) or sft."),
    rollouts: Optional[str] = typer.Option(None, help="Off-policy: folder of saved teacher rollouts to reuse (made if missing)."),
    consistency_weight: Optional[float] = typer.Option(None, help="Weight of the context-removability regulariser (0: off)."),
    consistency_start: Optional[int] = typer.Option(None, help="The regulariser's first step (default 1); before it the student learns from the teacher alone."),
    consistency_warmup: Optional[int] = typer.Option(None, help="Steps over which the regulariser's weight rises linearly from 0 to --consistency-weight, from --consistency-start (default 0: at once)."),
    anchor_weight: Optional[float] = typer.Option(None, help="Weight of the in-context anchor: the top-k KL from the student with the context to the teacher, on the same responses (0: off); keeps what the student does when the context is there."),
    eval_data: Optional[str] = typer.Option(None, help="Rows with answers, scored before and after training."),
    ood_data: Optional[str] = typer.Option(None, help="Out-of-distribution rows with answers (and their own contexts)."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Run directory (default runs/NAME-TIME)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing run directory."),
    save_every: Optional[int] = typer.Option(None, help="Keep a checkpoint every N steps (0: only the final model)."),
    topk: Optional[int] = typer.Option(None, help="Size of the student's top-k support of the KL (paper: 256)."),
    topk_renorm: Optional[bool] = typer.Option(None, "--topk-renorm", help="Renormalise both distributions within the top-k."),
    topk_tail: Optional[bool] = typer.Option(None, "--topk-tail", help="Add the mass outside the top-k as one more bucket of both distributions (a true KL on k + 1 buckets)."),
    topk_support: Optional[str] = typer.Option(None, help="The KL's support: student (its own top-k ids, the paper's) or union (the student's and the teacher's top-k ids)."),
    teacher_kind: Optional[str] = typer.Option(None, help="frozen (the student's initial weights, or --teacher; the paper's), ema (a moving average of the student, --ema-decay) or live (the current student with the context, no gradient)."),
    ema_decay: Optional[float] = typer.Option(None, help="With --teacher-kind ema: the teacher keeps this share of itself at each step (default 0.99)."),
    min_topk_mass: Optional[float] = typer.Option(None, help="Warn once when the student's mean probability inside its own top-k falls below this (default 0.8; 0: never): the loss is then being lowered by moving mass out of the support."),
    stop_on_escape: Optional[bool] = typer.Option(None, "--stop-on-escape", help="When the top-k mass falls below --min-topk-mass, stop and keep the weights of the last step above it."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps."),
    batch_size: Optional[int] = typer.Option(None, help="Prompts per micro-batch."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimiser step."),
    micro_batch_tokens: Optional[int] = typer.Option(None, help="Regroup each step's batch-size x grad-accum sequences into micro-batches of one row of at most N positions each, packed without padding (0, the default: batch-size prompts per micro-batch in padded rows). SDPA and eager attention read a whole row: one to two times the longest sequence is fastest there."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (paper: 1e-6 to 5e-6)."),
    lr_schedule: Optional[str] = typer.Option(None, help="constant, cosine or linear (after warmup)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warmup steps."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay."),
    max_grad_norm: Optional[float] = typer.Option(None, help="Gradient clipping norm."),
    seed: Optional[int] = typer.Option(None, help="Seed for prompt order and sampling."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature of the student's rollouts."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling threshold."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest response sampled."),
    eval_max_new_tokens: Optional[int] = typer.Option(None, help="Longest response when evaluating."),
    eval_before: Optional[bool] = typer.Option(None, "--eval-before/--no-eval-before", help="Also score the student before training."),
    eval_batch_size: Optional[int] = typer.Option(None, help="Prompts per generation batch when evaluating."),
    verifier: Optional[str] = typer.Option(None, help=f"{names(VERIFIERS)}."),
    dtype: Optional[str] = typer.Option(None, help=f"{names(DTYPES)} (auto: bf16 on a GPU, fp32 on a CPU)."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Run a model's own Python code (its config's auto_map); only for code you trust."),
    allow_bin_weights: Optional[bool] = typer.Option(None, "--allow-bin-weights", help="Also load pickled *.bin weights (through PyTorch's weights-only unpickler); safetensors only by default."),
    sampler: Optional[str] = typer.Option(None, help=f"{names(SAMPLERS)} (hf: Hugging Face generate)."),
    vllm_memory: Optional[float] = typer.Option(None, help="Share of GPU memory (host memory on a CPU) for the vLLM engine."),
    vllm_eager: Optional[bool] = typer.Option(None, "--vllm-eager", help="Start vLLM without compilation or graphs: faster to start, slower to sample."),
    chat_template_kwargs: Optional[str] = typer.Option(None, help='Keyword arguments for the chat templates, as JSON, e.g. \'{"enable_thinking": false}\' (both views get the same).'),
    report_to: Optional[str] = typer.Option(None, help=f"Also send the per-step metrics to a tracker: {names(REPORT_TO)} (wandb: offline unless WANDB_MODE is set)."),
    show_prompts: Optional[int] = typer.Option(None, help="Print the rendered teacher and student prompts of the first N rows before training (default 1; 0: none)."),
    kernel: Optional[str] = typer.Option(None, help=f"Loss implementation: {names(KERNELS)}."),
    lora_rank: Optional[int] = typer.Option(None, help="Train LoRA adapters of this rank (PEFT) instead of every weight; the default teacher is then the student with its adapters off."),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA scaling alpha (default: twice the rank)."),
    lora_dropout: Optional[float] = typer.Option(None, help="Dropout on the LoRA inputs (default 0)."),
    lora_targets: Optional[str] = typer.Option(None, help="Modules to adapt: all-linear (default) or names, comma-separated (q_proj,v_proj)."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help="With LoRA, also save the merged model beside the adapter (default: merge)."),
    teacher_sharding: Optional[str] = typer.Option(None, help=f"Under torchrun: {names(TEACHER_SHARDING)} the teacher across the processes (default replicate: a whole teacher on each)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute the student's activations in the backward pass: less memory, about a third more compute."),
    teacher_prefix_cache: Optional[bool] = typer.Option(None, "--teacher-prefix-cache/--no-teacher-prefix-cache", help="The teacher reads the start all its prompts share (the context) once per run and only the rest of each sequence after (default on; exact)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Read the model configs only and print the memory plan per device for this launch (no weights loaded, nothing written)."),
    world_size: Optional[int] = typer.Option(None, help="With --dry-run: plan for this many processes (default: torchrun's WORLD_SIZE, else 1)."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Distil a context into a student's weights, on-policy (no model arguments: the built-in toy world)."""
    flags = dict(locals())
    for key in ("recipe", "json_output", "toy_task", "resume", "dry_run", "world_size"):
        flags.pop(key, None)
    flags["chat_template_kwargs"] = parse_json_object(chat_template_kwargs)
    flags["env_options"] = parse_json_object(env_options, "--env-options", '{"size": 4}')
    flags["ood_env_options"] = parse_json_object(ood_env_options, "--ood-env-options", '{"law_seed": 7}')
    if resume is not None:
        if recipe is not None or toy_task is not None:
            raise OpcdError("--resume continues a run with its own settings; drop --recipe and --toy-task")
        resumed = resume_config(resume, flags)
        cfg = resumed.config
    else:
        cfg = build_distill_config(*distill_layers(recipe, toy_task, student, data), flags)
    main_process = environment_rank() == 0  # under torchrun, rank 0 alone prints
    ui = UI(quiet=not main_process)
    if resume is not None and resumed.not_given:
        ui.info(f"note: {resume} was started with {' and '.join(resumed.not_given)}; a run folder "
                "never grants a permission by itself, so this resume runs without (give the flag again to use it)")
    if world_size is not None and not dry_run:
        raise OpcdError("--world-size plans a launch with --dry-run; a real run's world size is torchrun's "
                        "--nproc-per-node x --nnodes")
    if world_size is not None and world_size < 1:
        raise OpcdError(f"--world-size must be at least 1; got {world_size}")
    if dry_run:
        from .memory import plan_for, show_plan  # reads configs only

        plan = plan_for(cfg, world_size)
        show_plan(ui, plan)
        if json_output and main_process:
            print_json(plan)
        return
    from .distill import distill as run_distill  # torch and transformers load here, after the flags are checked

    summary = run_distill(cfg, ui, resume=resume is not None)
    show_distill_summary(ui, summary)
    if json_output and main_process:
        print_json(summary)


def under_torchrun() -> bool:
    """Whether ``torchrun`` started this process as one of several (read without loading torch)."""
    return os.environ.get("WORLD_SIZE", "1") not in ("", "1")


def one_process_only(command: str) -> None:
    """``opcd eval`` and ``opcd extract`` run as one process: under torchrun every rank would do the whole work
    and write the same files."""
    if under_torchrun():
        raise OpcdError(f"opcd {command} runs as one process; start it without torchrun (opcd distill is the "
                        "command that runs on several)")


def environment_rank() -> int:
    """This process's rank under ``torchrun`` (0 outside it)."""
    rank = os.environ.get("RANK", "0") if under_torchrun() else "0"
    return int(rank) if rank.isdigit() else 0


def distill_layers(recipe: str | None, toy_task: str | None, student: str | None, data: str | None) -> list[dict]:
    """The settings under ``opcd distill``'s flags: ``--recipe``, over the built-in toy recipe when no student is
    given anywhere (``--toy-task`` picks which)."""
    if toy_task is not None:
        if toy_task not in TOY_TASKS:
            raise OpcdError(f"--toy-task must be one of {', '.join(TOY_TASKS)}; got {toy_task!r}")
        if student is not None:
            raise OpcdError("--toy-task runs the toy world's student; drop --student or --toy-task")
    if student is None and data is not None and recipe is None:
        raise OpcdError("--data needs --student: give the model to train (or drop --data to run the toy world)")
    layers = recipe_layers(recipe, "student", student, f"toy-{toy_task or 'codes'}")
    if toy_task is not None and len(layers) == 1:
        raise OpcdError(f"--toy-task runs the toy world's student, but {recipe} names a student; drop one of them")
    return layers


DISTILL_ROWS = [  # (label, EvalResult field)
    ("student, no context", "accuracy"),
    ("student, with context", "accuracy_with_context"),
    ("teacher, with context", "teacher_accuracy_with_context"),
    ("context harm", "context_harm"),
    ("student, OOD (own contexts)", "ood_accuracy"),
]
DISTILL_GAME_ROWS = [  # (label, GameEvalResult field): --env
    ("games won, no context", "success"),
    ("games won, with context", "success_with_context"),
    ("teacher games won, with context", "teacher_success_with_context"),
    ("context harm", "context_harm"),
    ("games won, OOD (own context)", "ood_success"),
    ("invalid moves, no context", "invalid_rate"),
]


def show_distill_summary(ui: UI, summary: dict) -> None:
    """The before/after table: one row per measured field of the two ``EvalResult``s."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    games = "success" in before or "success" in after
    rows = [[label, percent(before[key]) if key in before else "", percent(after[key]) if key in after else ""]
            for label, key in (DISTILL_GAME_ROWS if games else DISTILL_ROWS) if key in before or key in after]
    if rows:
        ui.table("games" if games else "accuracy", ["", "before", "after"], rows)
    phases = summary.get("time_by_phase") or {}
    if phases:
        ui.table(f"time per step ({phases['step_seconds']:.2f} s)", ["", "seconds", "share"],
                 [[name.replace("_", " "), f"{seconds:.3f}", percent(phases["shares"][name])]
                  for name, seconds in phases["seconds"].items()])
    for when, result in (("before", before), ("after", after)):
        if result.get("out_of_window"):
            from .games import window_warning

            ui.info(window_warning(result["out_of_window"], f"of the evaluation {when} training"))
    escape = summary.get("topk_mass_escape")
    if escape:
        from .escape import Escape

        ui.info(f"[yellow]warning:[/] {Escape(**escape).message()}")
    ui.info(f"{summary['steps']} steps in {summary['seconds']:.0f} s; student saved to {summary['output_dir']}")


@app.command()
def extract(
    recipe: Optional[str] = typer.Option(None, help="Recipe with default settings (a TOML file or a built-in name such as toy-codes-extract); flags override it."),
    model: Optional[str] = typer.Option(None, help="Model that solves and extracts. Omit for the toy world."),
    data: Optional[str] = typer.Option(None, help="Training problems with answers."),
    val: Optional[str] = typer.Option(None, help="Validation problems with answers (selects the best round)."),
    env: Optional[str] = typer.Option(None, help="Instead of --data and --val, a game played turn by turn: frozenlake, doors, or package.module:Class."),
    env_options: Optional[str] = typer.Option(None, help='The game\'s options, as JSON, e.g. \'{"size": 4}\'.'),
    max_turns: Optional[int] = typer.Option(None, help="With --env: most replies a game gets (default 10)."),
    train_games: Optional[int] = typer.Option(None, help="With --env: games played --attempts times each round (default 32)."),
    val_games: Optional[int] = typer.Option(None, help="With --env: other games whose success rate selects the best round (default 32)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Experience file to write (default exp.txt)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing output."),
    rounds: Optional[int] = typer.Option(None, help="Rounds of solve, extract, accumulate, select."),
    attempts: Optional[int] = typer.Option(None, help="Attempts per training problem and round."),
    experience: Optional[str] = typer.Option(None, help="Experience file to start from."),
    template: Optional[str] = typer.Option(None, help="Extraction prompt template; {traces} marks where attempts go."),
    traces_per_prompt: Optional[int] = typer.Option(None, help="Attempts shown per extraction prompt."),
    token_budget: Optional[int] = typer.Option(None, help="Keep the experience within this many tokens (whole items dropped, oldest first)."),
    context_as: Optional[str] = typer.Option(None, help=f"{names(CONTEXT_AS)}."),
    verifier: Optional[str] = typer.Option(None, help=f"{names(VERIFIERS)}."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature of the attempts."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling threshold of the attempts."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest attempt."),
    extract_max_new_tokens: Optional[int] = typer.Option(None, help="Longest extraction response."),
    batch_size: Optional[int] = typer.Option(None, help="Prompts per generation batch."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    sampler: Optional[str] = typer.Option(None, help=f"{names(SAMPLERS)} (hf: Hugging Face generate)."),
    vllm_memory: Optional[float] = typer.Option(None, help="Share of GPU memory (host memory on a CPU) for the vLLM engine."),
    vllm_eager: Optional[bool] = typer.Option(None, "--vllm-eager", help="Start vLLM without compilation or graphs: faster to start, slower to sample."),
    chat_template_kwargs: Optional[str] = typer.Option(None, help='Keyword arguments for the chat templates, as JSON, e.g. \'{"enable_thinking": false}\' (both views get the same).'),
    dtype: Optional[str] = typer.Option(None, help=f"{names(DTYPES)}."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Run a model's own Python code (its config's auto_map); only for code you trust."),
    allow_bin_weights: Optional[bool] = typer.Option(None, "--allow-bin-weights", help="Also load pickled *.bin weights (through PyTorch's weights-only unpickler); safetensors only by default."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Turn a model's own right and wrong attempts into experience items (no model arguments: the toy world)."""
    one_process_only("extract")
    flags = dict(locals())
    for key in ("recipe", "json_output"):
        flags.pop(key, None)
    flags["chat_template_kwargs"] = parse_json_object(chat_template_kwargs)
    flags["env_options"] = parse_json_object(env_options, "--env-options", '{"size": 4}')
    cfg = build_extract_config(*recipe_layers(recipe, "model", model, "toy-codes-extract", ExtractConfig), flags)
    from .extract import extract as run_extract  # torch and transformers load here, after the flags are checked

    ui = UI()
    summary = run_extract(cfg, ui)
    games = "env" in summary
    ui.table("experience by round", ["round", "items", "new", "games won" if games else "attempts right",
                                     "val games won" if games else "val accuracy"], [
        ["none", "0", "", "", percent(summary["val_accuracy_without"])]
    ] + [
        [str(r["number"]), str(r["items"]), str(r["new_items"]), percent(r["solve_rate"]), percent(r["val_accuracy"])]
        for r in summary["rounds"]
    ])
    ui.info(f"best: round {summary['best_round']} ({summary['items']} items, val {percent(summary['val_accuracy_best'])}) "
            f"written to {summary['output']}")
    if json_output:
        print_json(summary)


@app.command("eval")
def eval_command(
    model: list[str] = typer.Option(..., "--model", "-m", help="Model id or folder; repeat for several."),
    data: Optional[str] = typer.Option(None, help="Rows with answers: JSONL, JSON, CSV, Parquet or a saved dataset folder."),
    env: Optional[str] = typer.Option(None, help="Instead of --data, play a game turn by turn: frozenlake, or package.module:Class (see the README's Games)."),
    env_options: Optional[str] = typer.Option(None, help='The game\'s options, as JSON, e.g. \'{"size": 4, "slippery": false}\'.'),
    games: int = typer.Option(64, help="With --env: games to play (seeds --seed, --seed + 1, ...)."),
    max_turns: int = typer.Option(10, help="With --env: most replies a game gets."),
    context: Optional[str] = typer.Option(None, help="Context file (- for stdin): also score with it in front."),
    ood_data: Optional[str] = typer.Option(None, help="Out-of-distribution rows with answers (each with its own context)."),
    best: Optional[int] = typer.Option(None, help="Score a run directory as the mean of its N best checkpoints."),
    context_as: str = typer.Option("system", help="system (a system message) or user-prefix (before the user turn)."),
    verifier: str = typer.Option("auto", help=f"{names(VERIFIERS)} (auto: the row's `verifier`, else exact)."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    n: int = typer.Option(1, help="Samples per prompt (needs a temperature above 0)."),
    max_new_tokens: int = typer.Option(512, help="Longest response."),
    batch_size: int = typer.Option(64, help="Prompts per generation batch."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N rows."),
    seed: int = typer.Option(0, help="Seed for sampling."),
    sampler: str = typer.Option("hf", help=f"{names(SAMPLERS)} (hf: Hugging Face generate)."),
    vllm_memory: float = typer.Option(0.2, help="Share of GPU memory (host memory on a CPU) for the vLLM engine."),
    vllm_eager: bool = typer.Option(False, "--vllm-eager", help="Start vLLM without compilation or graphs: faster to start, slower to sample."),
    dtype: str = typer.Option("auto", help=f"{names(DTYPES)} (auto: bf16 on a GPU, fp32 on a CPU)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run a model's own Python code (its config's auto_map); only for code you trust."),
    allow_bin_weights: bool = typer.Option(False, "--allow-bin-weights", help="Also load pickled *.bin weights (through PyTorch's weights-only unpickler); safetensors only by default."),
    chat_template_kwargs: Optional[str] = typer.Option(None, help='Keyword arguments for the chat templates, as JSON, e.g. \'{"enable_thinking": false}\' (both views get the same).'),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Accuracy of one or more models on rows with answers (or, with --env, success in games), without the context
    and (when one is given) with it."""
    one_process_only("eval")
    cfg = EvalConfig(
        models=tuple(model), data=data, env=env, games=games, max_turns=max_turns,
        env_options=parse_json_object(env_options, "--env-options", '{"size": 4}') or {},
        ood_data=ood_data, best=best, context=context, context_as=context_as, verifier=verifier,
        batch_size=batch_size, seed=seed, limit=limit, sampler=sampler, vllm_memory=vllm_memory, vllm_eager=vllm_eager,
        sampling=SamplingOptions(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, n=n),
        loading=ModelOptions(dtype=dtype, trust_remote_code=trust_remote_code, allow_bin_weights=allow_bin_weights,
                             chat_template_kwargs=parse_json_object(chat_template_kwargs) or {}),
    )
    from .evaluate import evaluate  # torch and transformers load here, after the flags are checked

    ui = UI()
    with ui.progress():
        results = evaluate(cfg, progress=ui)
    if env is not None:
        show_eval_table(ui, results, f"games: {env}", GAME_COLUMNS)
        from .games import window_warning

        for result in results:
            if result.get("out_of_window"):
                ui.info(window_warning(result["out_of_window"], f"of {result['model']}"))
    else:
        show_eval_table(ui, results)
    if json_output:
        print_json(results[0] if len(results) == 1 else {"results": results})


@app.command()
def plot(
    runs: list[str] = typer.Argument(..., help="Run folders (or metrics.jsonl files) to draw, one line each."),
    output: str = typer.Option(..., "--output", "-o", help="PNG file to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Draw runs' per-step metrics (loss, top-k mass, response length, learning rate, gradient norm, the student's
    and the teacher's entropy, the share of distinct tokens) into one PNG."""
    from .plots import plot_runs, read_metrics

    from .outputs import check_output_path

    out = Path(output)
    if out.suffix.lower() != ".png":
        raise OpcdError(f"-o {output}: give a .png file name")
    if out.is_dir():
        raise OpcdError(f"-o {output} is a folder; give a .png file name")
    if out.exists() and not overwrite:
        raise OpcdError(f"{output} exists; pass --overwrite to replace it")
    check_output_path(output, "-o")
    drawn = [(Path(r).name.removesuffix(".partial") or r, read_metrics(Path(r))) for r in runs]
    try:
        plot_runs(drawn, out)
    except OSError as e:
        raise OpcdError(f"cannot write {output}: {e.strerror or e}") from None
    UI().info(f"{len(drawn)} run(s), {sum(len(rows) for _, rows in drawn)} steps drawn into {out}")
    if json_output:
        print_json({"output": str(out), "runs": [{"run": r, "steps": len(rows)} for r, (_, rows) in zip(runs, drawn)]})


EVAL_COLUMNS = [  # (header, result key, format)
    ("n", "n", str),
    ("no context", "accuracy", percent),
    ("with context", "accuracy_with_context", percent),
    ("context harm", "context_harm", percent),
    ("OOD", "ood_accuracy", percent),
    ("tokens", "mean_response_tokens", lambda x: f"{x:.1f}"),
    ("tokens with context", "mean_response_tokens_with_context", lambda x: f"{x:.1f}"),
]


GAME_COLUMNS = [  # (header, result key, format)
    ("games", "games", str),
    ("success", "success", percent),
    ("with context", "success_with_context", percent),
    ("context harm", "context_harm", percent),
    ("turns", "mean_turns", lambda x: f"{x:.2f}"),
    ("turns with context", "mean_turns_with_context", lambda x: f"{x:.2f}"),
    ("invalid moves", "invalid_rate", percent),
    ("invalid with context", "invalid_rate_with_context", percent),
]


def show_eval_table(ui: UI, results: list[dict], title: str = "evaluation", all_columns=EVAL_COLUMNS) -> None:
    """One row per model; columns only for what was measured."""
    columns = [c for c in all_columns if any(c[1] in r for r in results)]
    rows = [[r["model"]] + [fmt(r[key]) if key in r else "-" for _, key, fmt in columns] for r in results]
    ui.table(title, ["model"] + [header for header, _, _ in columns], rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    try:
        result = app(args=argv, standalone_mode=False, prog_name="opcd")
    except Interrupted as e:
        print(f"opcd: {e}", file=sys.stderr)
        return e.code
    except OpcdError as e:
        print(f"opcd: error: {e}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("opcd: interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as e:  # flag parsing: unknown options, values of the wrong type
        if type(e).__name__ == "NoArgsIsHelpError":  # plain `opcd`: show the commands
            print(e.ctx.get_help())
            return 0
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"opcd: error: {' '.join(message.split())}{hint}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
