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

from . import cli_options as o
from .cli_options import DATA, EVALUATION, GAMES, LORA, LOSS, MODELS, OUTPUT, SAMPLING, SCALING, TRAINING, WORK, flag
from .config import (
    DISTILL_MODES, KERNELS, OBJECTIVES, OFF_POLICY_LOSSES, REPORT_TO, SCHEDULES, TEACHER_KINDS, TEACHER_SHARDING,
    TOPK_SUPPORTS,
    EvalConfig, ExtractConfig, build_config, build_distill_config, build_extract_config, parse_json_object, read_recipe,
    resume_config,
)
from .errors import Interrupted, OpcdError
from .cli_bench import bench_app
from .cli_data import data_app
from .cli_tables import GAME_COLUMNS, show_distill_summary, show_eval_table, show_extract_summary
from .ui import UI, print_json

app = typer.Typer(
    name="opcd",
    help="On-Policy Context Distillation: move what a model knows from its context into its weights.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # the help's panels; no help text holds markup
)

TOY_TASKS = ("codes", "shift", "recall", "game")

app.add_typer(bench_app)  # opcd bench loss | step | run (cli_bench.py)
app.add_typer(data_app)  # opcd data preview (cli_data.py)


def recipe_layers(recipe: str | None, model_key: str, model_flag: str | None, toy_recipe: str, cls=None):
    """The settings layers under the flags: ``--recipe``, on top of the built-in ``toy_recipe`` when no model is
    given anywhere (neither by flag nor by the recipe)."""
    chosen = read_recipe(recipe, cls) if recipe else {}
    if model_flag is not None or model_key in chosen:
        return [chosen]
    return [read_recipe(toy_recipe, cls), chosen]


@app.command()
def distill(
    # models
    student: Optional[str] = flag(None, help="Student: Hugging Face id or local folder. Omit to run the toy world.", panel=MODELS),
    teacher: Optional[str] = flag(None, help="Frozen teacher. Omit for a frozen copy of the student.", panel=MODELS),
    teacher_kind: Optional[str] = flag(None, help="frozen (the student's initial weights, or --teacher; the paper's), ema (a moving average of the student, --ema-decay) or live (the current student with the context, no gradient).", panel=MODELS, choices=TEACHER_KINDS),
    ema_decay: Optional[float] = flag(None, help="With --teacher-kind ema: the teacher keeps this share of itself at each step (default 0.99).", panel=MODELS),
    toy_task: Optional[str] = flag(None, help="Run the toy world's task (the built-in recipe toy-TASK).", panel=MODELS, choices=TOY_TASKS),
    dtype: o.Dtype = None,
    trust_remote_code: o.TrustRemoteCode = None,
    allow_bin_weights: o.AllowBinWeights = None,
    chat_template_kwargs: o.ChatTemplateKwargs = None,
    # data and context
    data: Optional[str] = flag(None, help="Prompts: JSONL, JSON, CSV, Parquet, a saved dataset folder or hf:ORG/NAME[:CONFIG] (datasets.load_dataset, offline from its cache).", panel=DATA),
    split: o.Split = None,
    context: o.Context = None,
    context_as: o.ContextAs = None,
    prompt_field: o.PromptField = None,
    messages_field: o.MessagesField = None,
    context_field: o.ContextField = None,
    answer_field: o.AnswerField = None,
    prompt_template: o.PromptTemplate = None,
    answer_template: o.AnswerTemplate = None,
    # games
    env: o.Env = None,
    env_options: o.EnvOptions = None,
    max_turns: o.MaxTurns = None,
    eval_games: Optional[int] = flag(None, help="With --env: games scored before and after training, seeds 0 to N-1 (default 64).", panel=GAMES),
    ood_env_options: Optional[str] = flag(None, help="With --env: options of games out of distribution (JSON, over --env-options), played with --ood-context.", panel=GAMES),
    ood_context: Optional[str] = flag(None, help="With --env: the context of the games out of distribution.", panel=GAMES),
    # the loss
    mode: Optional[str] = flag(None, help="on-policy (OPCD: the student's own responses) or off-policy (the teacher's).", panel=LOSS, choices=DISTILL_MODES),
    off_policy_loss: Optional[str] = flag(None, help="Off-policy loss: forward-kl (the teacher's top-k) or sft.", panel=LOSS, choices=OFF_POLICY_LOSSES),
    rollouts: Optional[str] = flag(None, help="Off-policy: folder of saved teacher rollouts to reuse (made if missing).", panel=LOSS),
    objective: Optional[str] = flag(None, help="The on-policy distillation term: topk-reverse-kl (the paper's: KL(student || teacher) over the student's top-k), sampled-token (the reverse KL on the sampled tokens only, a policy-gradient step: the cheapest), topk-forward-kl (KL(teacher || student) over the teacher's top-k) or jsd (the generalised JSD over the full vocabulary, --jsd-beta).", panel=LOSS, choices=OBJECTIVES),
    jsd_beta: Optional[float] = flag(None, help="With --objective jsd: the teacher's share of the mixture, as TRL's GKD defines it (0: forward KL, 1: reverse KL; default 0.5).", panel=LOSS),
    reward_weight: Optional[float] = flag(None, help="Weight of the verifier's reward on the student's samples, as a policy-gradient term with the group's mean reward removed (GRPO-style; needs --samples-per-prompt 2 or more and rows with answers; 0: off).", panel=LOSS),
    reward_std: Optional[bool] = flag(None, "--reward-std", help="With --reward-weight: also divide each advantage by its group's standard deviation (GRPO's form).", panel=LOSS),
    topk: Optional[int] = flag(None, help="Size of the student's top-k support of the KL (paper: 256).", panel=LOSS),
    topk_renorm: Optional[bool] = flag(None, "--topk-renorm", help="Renormalise both distributions within the top-k.", panel=LOSS),
    topk_tail: Optional[bool] = flag(None, "--topk-tail", help="Add the mass outside the top-k as one more bucket of both distributions (a true KL on k + 1 buckets).", panel=LOSS),
    topk_support: Optional[str] = flag(None, help="The KL's support: student (its own top-k ids, the paper's) or union (the student's and the teacher's top-k ids).", panel=LOSS, choices=TOPK_SUPPORTS),
    consistency_weight: Optional[float] = flag(None, help="Weight of the context-removability regulariser (0: off).", panel=LOSS),
    consistency_start: Optional[int] = flag(None, help="The regulariser's first step (default 1); before it the student learns from the teacher alone.", panel=LOSS),
    consistency_warmup: Optional[int] = flag(None, help="Steps over which the regulariser's weight rises linearly from 0 to --consistency-weight, from --consistency-start (default 0: at once).", panel=LOSS),
    anchor_weight: Optional[float] = flag(None, help="Weight of the in-context anchor: the top-k KL from the student with the context to the teacher, on the same responses (0: off); keeps what the student does when the context is there.", panel=LOSS),
    anchor_start: Optional[int] = flag(None, help="The anchor's first step (default 1).", panel=LOSS),
    user_prefix_consistency: Optional[bool] = flag(None, "--user-prefix-consistency/--no-user-prefix-consistency", help="With --context-as user-prefix and neither --consistency-weight nor --anchor-weight: the consistency regulariser at 0.02 from the second half of the steps (default on; it keeps the context harmless when it is put back).", panel=LOSS),
    anchor_warmup: Optional[int] = flag(None, help="Steps over which the anchor's weight rises linearly from 0 to --anchor-weight, from --anchor-start (default 0: at once).", panel=LOSS),
    kernel: Optional[str] = flag(None, help="Loss implementation.", panel=LOSS, choices=KERNELS),
    min_topk_mass: Optional[float] = flag(None, help="Warn once when the student's mean probability inside its own top-k falls below this (default 0.8; 0: never): the loss is then being lowered by moving mass out of the support.", panel=LOSS),
    stop_on_escape: Optional[bool] = flag(None, "--stop-on-escape", help="When the top-k mass falls below --min-topk-mass, stop and keep the weights of the last step above it.", panel=LOSS),
    # training
    steps: Optional[int] = flag(None, help="Optimiser steps.", panel=TRAINING),
    batch_size: Optional[int] = flag(None, help="Prompts per micro-batch.", panel=TRAINING),
    grad_accum: Optional[int] = flag(None, help="Micro-batches per optimiser step.", panel=TRAINING),
    samples_per_prompt: Optional[int] = flag(None, help="On-policy: the student's responses to each prompt of a step (default 1, the paper's); each step trains on batch-size x grad-accum x N sequences.", panel=TRAINING),
    micro_batch_tokens: Optional[int] = flag(None, help="Regroup each step's batch-size x grad-accum sequences into micro-batches of one row of at most N positions each, packed without padding (0, the default: batch-size prompts per micro-batch in padded rows). SDPA and eager attention read a whole row: one to two times the longest sequence is fastest there.", panel=TRAINING),
    lr: Optional[float] = flag(None, help="Learning rate (paper: 1e-6 to 5e-6).", panel=TRAINING),
    lr_schedule: Optional[str] = flag(None, help="The learning rate after the warmup.", panel=TRAINING, choices=SCHEDULES),
    warmup_steps: Optional[int] = flag(None, help="Linear warmup steps.", panel=TRAINING),
    weight_decay: Optional[float] = flag(None, help="AdamW weight decay.", panel=TRAINING),
    max_grad_norm: Optional[float] = flag(None, help="Gradient clipping norm.", panel=TRAINING),
    # sampling
    temperature: o.Temperature = None,
    top_p: o.TopP = None,
    max_new_tokens: o.MaxNewTokens = None,
    seed: o.Seed = None,
    sampler: o.Sampler = None,
    vllm_memory: o.VllmMemory = None,
    vllm_eager: o.VllmEager = None,
    # evaluation
    eval_data: Optional[str] = flag(None, help="Rows with answers, scored before and after training.", panel=EVALUATION),
    eval_split: o.EvalSplit = None,
    ood_data: Optional[str] = flag(None, help="Out-of-distribution rows with answers (and their own contexts).", panel=EVALUATION),
    eval_max_new_tokens: Optional[int] = flag(None, help="Longest response when evaluating.", panel=EVALUATION),
    eval_before: Optional[bool] = flag(None, "--eval-before/--no-eval-before", help="Also score the student before training.", panel=EVALUATION),
    eval_batch_size: Optional[int] = flag(None, help="Prompts per generation batch when evaluating.", panel=EVALUATION),
    verifier: o.Verifier = None,
    # output and resume
    recipe: o.Recipe = None,
    resume: Optional[str] = flag(None, help="Continue a run from its saved state: its .partial folder, or a finished run with a higher --steps.", panel=OUTPUT),
    name: Optional[str] = flag(None, help="Run name for the default output directory (default: the student's).", panel=OUTPUT),
    output_dir: Optional[str] = flag(None, "--output-dir", "-o", help="Run directory (default runs/NAME-TIME).", panel=OUTPUT),
    overwrite: Optional[bool] = flag(None, "--overwrite", help="Replace an existing run directory (an opcd run only).", panel=OUTPUT),
    save_every: Optional[int] = flag(None, help="Keep a checkpoint every N steps (0: only the final model).", panel=OUTPUT),
    show_prompts: Optional[int] = flag(None, help="Print the rendered teacher and student prompts of the first N rows before training (default 1; 0: none).", panel=OUTPUT),
    report_to: Optional[str] = flag(None, help="Also send the per-step metrics to a tracker (wandb: offline unless WANDB_MODE is set).", panel=OUTPUT, choices=REPORT_TO),
    json_output: o.JsonOutput = False,
    # scaling out
    teacher_sharding: Optional[str] = flag(None, help="Under torchrun: replicate (a whole teacher on each process, the default) or shard the teacher across the processes.", panel=SCALING, choices=TEACHER_SHARDING),
    gradient_checkpointing: Optional[bool] = flag(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute the student's activations in the backward pass: less memory, about a third more compute.", panel=SCALING),
    teacher_prefix_cache: Optional[bool] = flag(None, "--teacher-prefix-cache/--no-teacher-prefix-cache", help="The teacher reads the start all its prompts share (the context) once per run and only the rest of each sequence after (default on; exact).", panel=SCALING),
    dry_run: bool = flag(False, "--dry-run", help="Read the model configs only and print the memory plan per device for this launch (no weights loaded, nothing written).", panel=SCALING),
    world_size: Optional[int] = flag(None, help="With --dry-run: plan for this many processes (default: torchrun's WORLD_SIZE, else 1).", panel=SCALING),
    # LoRA
    lora_rank: Optional[int] = flag(None, help="Train LoRA adapters of this rank (PEFT) instead of every weight; the default teacher is then the student with its adapters off.", panel=LORA),
    lora_alpha: Optional[float] = flag(None, help="LoRA scaling alpha (default: twice the rank).", panel=LORA),
    lora_dropout: Optional[float] = flag(None, help="Dropout on the LoRA inputs (default 0).", panel=LORA),
    lora_targets: Optional[str] = flag(None, help="Modules to adapt: all-linear (default) or names, comma-separated (q_proj,v_proj).", panel=LORA),
    merge: Optional[bool] = flag(None, "--merge/--no-merge", help="With LoRA, also save the merged model beside the adapter (default: merge).", panel=LORA),
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


@app.command()
def extract(
    model: Optional[str] = flag(None, help="Model that solves and extracts. Omit for the toy world.", panel=MODELS),
    dtype: o.Dtype = None,
    trust_remote_code: o.TrustRemoteCode = None,
    allow_bin_weights: o.AllowBinWeights = None,
    chat_template_kwargs: o.ChatTemplateKwargs = None,
    data: Optional[str] = flag(None, help="Training problems with answers.", panel=DATA),
    val: Optional[str] = flag(None, help="Validation problems with answers (selects the best round).", panel=DATA),
    split: o.Split = None,
    eval_split: Optional[str] = flag(None, help="The split of --val when it is hf:ORG/NAME (default test, else validation, else its only one).", panel=DATA),
    prompt_field: o.PromptField = None,
    messages_field: o.MessagesField = None,
    context_field: o.ContextField = None,
    answer_field: o.AnswerField = None,
    prompt_template: o.PromptTemplate = None,
    answer_template: o.AnswerTemplate = None,
    context_as: o.ContextAs = None,
    env: o.Env = None,
    env_options: o.EnvOptions = None,
    max_turns: o.MaxTurns = None,
    train_games: Optional[int] = flag(None, help="With --env: games played --attempts times each round (default 32).", panel=GAMES),
    val_games: Optional[int] = flag(None, help="With --env: other games whose success rate selects the best round (default 32).", panel=GAMES),
    rounds: Optional[int] = flag(None, help="Rounds of solve, extract, accumulate, select.", panel=WORK),
    attempts: Optional[int] = flag(None, help="Attempts per training problem and round.", panel=WORK),
    experience: Optional[str] = flag(None, help="Experience file to start from.", panel=WORK),
    template: Optional[str] = flag(None, help="Extraction prompt template; {traces} marks where attempts go.", panel=WORK),
    traces_per_prompt: Optional[int] = flag(None, help="Attempts shown per extraction prompt.", panel=WORK),
    token_budget: Optional[int] = flag(None, help="Keep the experience within this many tokens (whole items dropped, oldest first).", panel=WORK),
    extract_max_new_tokens: Optional[int] = flag(None, help="Longest extraction response.", panel=WORK),
    verifier: o.Verifier = None,
    temperature: o.Temperature = None,
    top_p: o.TopP = None,
    max_new_tokens: o.MaxNewTokens = None,
    batch_size: Optional[int] = flag(None, help="Prompts per generation batch.", panel=SAMPLING),
    seed: o.Seed = None,
    sampler: o.Sampler = None,
    vllm_memory: o.VllmMemory = None,
    vllm_eager: o.VllmEager = None,
    recipe: o.Recipe = None,
    output: Optional[str] = flag(None, "--output", "-o", help="Experience file to write (default exp.txt).", panel=OUTPUT),
    overwrite: o.Overwrite = None,
    json_output: o.JsonOutput = False,
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
    show_extract_summary(ui, summary)
    if json_output:
        print_json(summary)


@app.command("eval")
def eval_command(
    model: list[str] = flag(..., "--model", "-m", help="Model id or folder; repeat for several.", panel=MODELS),
    dtype: o.Dtype = None,
    trust_remote_code: o.TrustRemoteCode = None,
    allow_bin_weights: o.AllowBinWeights = None,
    chat_template_kwargs: o.ChatTemplateKwargs = None,
    data: Optional[str] = flag(None, help="Rows with answers: JSONL, JSON, CSV, Parquet, a saved dataset folder or hf:ORG/NAME[:CONFIG].", panel=DATA),
    split: o.Split = None,
    context: o.Context = None,
    context_as: o.ContextAs = None,
    ood_data: Optional[str] = flag(None, help="Out-of-distribution rows with answers (each with its own context).", panel=DATA),
    limit: Optional[int] = flag(None, help="Score only the first N rows.", panel=DATA),
    prompt_field: o.PromptField = None,
    messages_field: o.MessagesField = None,
    context_field: o.ContextField = None,
    answer_field: o.AnswerField = None,
    prompt_template: o.PromptTemplate = None,
    answer_template: o.AnswerTemplate = None,
    env: o.Env = None,
    env_options: o.EnvOptions = None,
    games: Optional[int] = flag(None, help="With --env: games to play, seeds --seed, --seed + 1, ... (default 64).", panel=GAMES),
    max_turns: o.MaxTurns = None,
    best: Optional[int] = flag(None, help="Score a run directory as the mean of its N best checkpoints.", panel=EVALUATION),
    verifier: o.Verifier = None,
    temperature: o.Temperature = None,
    top_p: o.TopP = None,
    n: Optional[int] = flag(None, help="Samples per prompt (needs a temperature above 0).", panel=SAMPLING),
    max_new_tokens: o.MaxNewTokens = None,
    batch_size: Optional[int] = flag(None, help="Prompts per generation batch (default 64).", panel=SAMPLING),
    seed: o.Seed = None,
    sampler: o.Sampler = None,
    vllm_memory: o.VllmMemory = None,
    vllm_eager: o.VllmEager = None,
    recipe: o.Recipe = None,
    json_output: o.JsonOutput = False,
) -> None:
    """Accuracy of one or more models on rows with answers (or, with --env, success in games), without the context
    and (when one is given) with it; greedy unless --temperature says otherwise."""
    one_process_only("eval")
    flags = dict(locals(), models=tuple(model))
    for key in ("recipe", "json_output", "model"):
        flags.pop(key, None)
    flags["chat_template_kwargs"] = parse_json_object(chat_template_kwargs)
    flags["env_options"] = parse_json_object(env_options, "--env-options", '{"size": 4}')
    cfg = build_config(EvalConfig, read_recipe(recipe, EvalConfig) if recipe else {}, flags)
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
    json_output: o.JsonOutput = False,
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
