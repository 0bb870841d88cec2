"""``opcd bench``: the benchmarks as shipped commands, with baselines that fail a CI job on a regression.

    opcd bench loss --preset cpu-smoke --baseline bench/baselines/cpu-smoke.json   # exit 1 on a regression
    opcd bench step --model-preset qwen3-1.7b --teacher-preset qwen3-8b              # one step, phase by phase
    opcd bench run                                                                   # a short toy run's numbers
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .cli_options import flag, option
from .errors import OpcdError
from .ui import UI, percent, print_json

bench_app = typer.Typer(name="bench", help="Benchmarks of the loss, a training step and a toy run, with "
                        "baselines that gate a CI job.", no_args_is_help=True, rich_markup_mode="rich")
SHAPE, GATE, OUT = "Shape", "Baseline and gate", "Output"

SaveBaseline = Annotated[Optional[str], option(help="Write the numbers as a baseline file.", panel=GATE)]
Baseline = Annotated[Optional[str], option(
    help="Compare with this baseline: exit 1 with one line per regression, 0 when every number holds.", panel=GATE)]
MaxSlowdown = Annotated[float, option(help="A ratio this much above the baseline's is a regression.", panel=GATE)]
MaxMemoryGrowth = Annotated[float, option(help="Peak memory this much above the baseline's is a regression.",
                                          panel=GATE)]
Tolerance = Annotated[float, option(help="How far (relative) a loss or other value may move.", panel=GATE)]
Json = Annotated[bool, option("--json", help="Print one JSON object on stdout (the table goes to stderr).",
                              panel=OUT)]


def prepare_gate(bench: str, baseline, max_slowdown, max_memory_growth, tolerance):
    """The limits and the baseline, checked before any work: a bad limit, a missing or foreign baseline, or one
    from another device kind is one line, at once."""
    from .benchmarks import gate as g
    from .benchmarks.machine import device, device_kind

    limits = g.Limits(max_slowdown, max_memory_growth, tolerance)
    old = g.load(baseline) if baseline else None
    if old is not None:
        g.check_comparable(old, bench, device_kind(device()), baseline)
    return limits, old


def finish_gate(result: dict, ui: UI, limits, old, save_baseline, baseline) -> int:
    """Save and compare as asked; the exit code (1: a regression)."""
    from .benchmarks import gate as g

    regressions = g.compare(old, result, limits, baseline) if old is not None else None
    if save_baseline:
        g.save(result, save_baseline)
        ui.info(f"baseline written to {save_baseline}")
    result["regressions"] = regressions
    if regressions:
        for line in regressions:
            ui.info(f"regression: {line}")
        return 1
    if old is not None:
        ui.info(f"every number holds against {baseline}")
    return 0


@bench_app.command("loss")
def bench_loss_command(
    preset: Optional[str] = flag(None, help="Named shapes: cpu-smoke (a CPU, under a minute) or paper (an H100 or "
                                 "H200). Default: cpu-smoke on a CPU, paper on a GPU.", panel=SHAPE),
    tokens: Optional[int] = flag(None, help="Instead of a preset: tokens N.", panel=SHAPE),
    vocab: Optional[int] = flag(None, help="Vocabulary V.", panel=SHAPE),
    hidden: Optional[int] = flag(None, help="The student's hidden size H.", panel=SHAPE),
    teacher_hidden: Optional[int] = flag(None, help="The teacher's hidden size M (default H).", panel=SHAPE),
    topk: int = flag(256, help="Top-k k.", panel=SHAPE),
    dtype: Optional[str] = flag(None, help="float32 or bfloat16 (default: bfloat16 on a GPU, float32 on a CPU).",
                                panel=SHAPE),
    providers: Optional[str] = flag(None, help="Comma-separated: triton, torch_chunked, eager, liger_jsd, trl_topk "
                                    "(matmul_floor always runs). Default: all that run here.", panel=SHAPE),
    repeats: int = flag(10, help="Timed runs of each provider, taking turns.", panel=SHAPE),
    warmup: int = flag(2, help="Untimed runs first.", panel=SHAPE),
    threads: Optional[int] = flag(None, help="CPU threads for the timings (default 1 on a CPU: steadier).", panel=SHAPE),
    save_baseline: SaveBaseline = None,
    baseline: Baseline = None,
    max_slowdown: MaxSlowdown = 1.3,
    max_memory_growth: MaxMemoryGrowth = 1.2,
    tolerance: Tolerance = 1e-3,
    json_output: Json = False,
) -> int:
    """The fused top-k reverse-KL loss, forward and backward, against its alternatives: time (median and spread),
    time over the four-matmul floor, peak memory beyond the inputs, and each one's loss and gradients against
    the naive reference."""
    from .benchmarks.loss_bench import PRESETS, bench_loss, parse_shape

    custom = (tokens, vocab, hidden)
    if preset is not None and any(v is not None for v in custom):
        raise OpcdError("give --preset or a shape (--tokens, --vocab, --hidden), not both")
    if any(v is not None for v in custom):
        if any(v is None for v in custom):
            raise OpcdError("a shape needs --tokens, --vocab and --hidden (--teacher-hidden and --topk are optional)")
        shapes = [parse_shape(tokens, vocab, hidden, teacher_hidden, topk)]
    else:
        import torch

        preset = preset or ("paper" if torch.cuda.is_available() else "cpu-smoke")
        if preset not in PRESETS:
            raise OpcdError(f"--preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        shapes = PRESETS[preset]
    if repeats < 3 or warmup < 0 or (threads is not None and threads < 1):
        raise OpcdError(f"--repeats must be at least 3, --warmup at least 0 and --threads at least 1; got {repeats}, "
                        f"{warmup} and {threads}")
    limits, old = prepare_gate("loss", baseline, max_slowdown, max_memory_growth, tolerance)
    ui = UI()
    names = [p.strip() for p in providers.split(",") if p.strip()] if providers else None
    with ui.progress():
        result = bench_loss(shapes, names, dtype, repeats, warmup, progress=ui, preset=preset, threads=threads)
    show_loss(ui, result)
    code = finish_gate(result, ui, limits, old, save_baseline, baseline)
    if json_output:
        print_json(result)
    return code


def show_loss(ui: UI, result: dict) -> None:
    def err(row):
        return f"{max(row['loss_err'], row['grad_h_err'], row['grad_w_err']):.1e}" if "loss_err" in row else "-"

    rows = [[r["name"], r["shape"], f"{r['median_ms']:.2f}", percent(r["spread"]), f"{r['time_over_floor']:.2f}x",
             f"{r['over_opcd']:.2f}x" if r.get("over_opcd") else "-",
             f"{r['peak_mb']:.1f}" if r.get("peak_mb") is not None else "-", err(r),
             {True: "yes", False: "NO"}.get(r.get("ok"), "-")] for r in result["rows"]]
    ui.table(f"opcd bench loss ({result['dtype']}, {result['machine']['device_kind']}, {result['repeats']} runs each, "
             f"{result['clock']})",
             ["provider", "shape", "median ms", "spread", "x floor", f"x {result['opcd_provider']}", "peak MiB",
              "max rel err", "ok"], rows)
    for skipped in result["skipped"]:
        ui.info(f"{skipped['name']}: not run ({skipped['why']})")


@bench_app.command("step")
def bench_step_command(
    student: Optional[str] = flag(None, help="A shape preset (qwen3-1.7b, qwen3-4b, qwen3-8b, llama-3.2-3b, tiny) or a "
                                  "local model folder (its config.json; random weights). Default: qwen3-1.7b on a "
                                  "GPU, tiny on a CPU.", panel=SHAPE),
    teacher: Optional[str] = flag(None, help="The teacher's shape (default: qwen3-8b with qwen3-1.7b, "
                                  "tiny-teacher with tiny, else the student's).", panel=SHAPE),
    kernel: str = flag("triton,torch", help="Loss implementations to compare, comma-separated (triton on a GPU).",
                       panel=SHAPE),
    prompts: int = flag(4, help="Sequences in the step.", panel=SHAPE),
    prompt_tokens: int = flag(128, help="Tokens per prompt.", panel=SHAPE),
    response_tokens: int = flag(256, help="Tokens per response.", panel=SHAPE),
    context_tokens: int = flag(256, help="Tokens of context the teacher reads first.", panel=SHAPE),
    topk: int = flag(256, help="Top-k k.", panel=SHAPE),
    micro_batch_tokens: int = flag(0, help="Pack the sequences into rows of at most N positions (0: a padded row "
                                   "each).", panel=SHAPE),
    steps: int = flag(3, help="Timed steps per implementation, after one warm-up step.", panel=SHAPE),
    objective: str = flag("topk-reverse-kl", help="Objectives to compare (opcd distill --objective), comma-separated; "
                          "each row's step over the top-k reverse KL's in the same run when it is among them.",
                          panel=SHAPE),
    reward: bool = flag(False, "--reward", help="Also time each objective with the reward's policy-gradient term "
                        "(random advantages).", panel=SHAPE),
    save_baseline: SaveBaseline = None,
    baseline: Baseline = None,
    max_slowdown: MaxSlowdown = 1.3,
    max_memory_growth: MaxMemoryGrowth = 1.2,
    tolerance: Tolerance = 1e-3,
    json_output: Json = False,
) -> int:
    """One training step at a model's shape (random weights), phase by phase, for each loss implementation and
    objective."""
    for name, value, least in (("prompts", prompts, 1), ("prompt-tokens", prompt_tokens, 1),
                               ("response-tokens", response_tokens, 1), ("context-tokens", context_tokens, 0),
                               ("topk", topk, 1), ("micro-batch-tokens", micro_batch_tokens, 0), ("steps", steps, 1)):
        if value < least:
            raise OpcdError(f"--{name} must be at least {least}; got {value}")
    import torch

    from .benchmarks.step_bench import bench_step

    limits, old = prepare_gate("step", baseline, max_slowdown, max_memory_growth, tolerance)
    student = student or ("qwen3-1.7b" if torch.cuda.is_available() else "tiny")
    teacher = teacher or {"qwen3-1.7b": "qwen3-8b", "tiny": "tiny-teacher"}.get(student, student)
    ui = UI()
    kernels = [k.strip() for k in kernel.split(",") if k.strip()]
    unknown = [k for k in kernels if k not in ("triton", "torch")]
    if unknown or not kernels:
        raise OpcdError(f"--kernel takes triton and torch, comma-separated; got {kernel!r}")
    from .config import OBJECTIVES

    objectives = tuple(o.strip() for o in objective.split(",") if o.strip())
    if not objectives or any(o not in OBJECTIVES for o in objectives):
        raise OpcdError(f"--objective takes {', '.join(OBJECTIVES)}, comma-separated; got {objective!r}")
    with ui.progress():
        task = ui.task(f"step {student} <- {teacher}", steps * len(kernels) * len(objectives) * (1 + reward))
        result = bench_step(student, teacher, kernels, prompts=prompts, prompt_tokens=prompt_tokens,
                            response_tokens=response_tokens, context_tokens=context_tokens, topk=topk, steps=steps,
                            micro_batch_tokens=micro_batch_tokens, objectives=objectives, reward=reward,
                            progress=lambda: task(1))
    phases = ("teacher_forward", "student_forward", "loss", "backward", "optimizer", "step_s")
    ui.table(f"opcd bench step: {student} <- {teacher}, {prompts} x ({prompt_tokens} + {response_tokens}) tokens, "
             f"median of {steps} (seconds)",
             ["kernel", *[p.replace("_s", "") for p in phases], "loss / forward", "step / OPCD's", "peak MiB"],
             [[r["name"], *[f"{r[p]:.3f}" for p in phases], f"{r['loss_over_forward']:.2f}x",
               f"{r['step_over_opcd']:.2f}x" if r.get("step_over_opcd") is not None else "-",
               f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"] for r in result["rows"]])
    code = finish_gate(result, ui, limits, old, save_baseline, baseline)
    if json_output:
        print_json(result)
    return code


@bench_app.command("run")
def bench_run_command(
    task: str = flag("codes", help="The toy task: codes, shift or recall.", panel=SHAPE),
    steps: int = flag(10, help="Training steps.", panel=SHAPE),
    seed: int = flag(0, help="The run's seed.", panel=SHAPE),
    save_baseline: SaveBaseline = None,
    baseline: Baseline = None,
    max_slowdown: MaxSlowdown = 1.3,
    max_memory_growth: MaxMemoryGrowth = 1.2,
    tolerance: Tolerance = 1e-3,
    json_output: Json = False,
) -> int:
    """A short toy run end to end: loss at the first and last step, top-k mass, accuracy after, peak memory,
    seconds per step."""
    if task not in ("codes", "shift", "recall"):
        raise OpcdError(f"--task must be codes, shift or recall; got {task!r}")
    if steps < 1:
        raise OpcdError(f"--steps must be at least 1; got {steps}")
    from .benchmarks.run_bench import bench_run

    limits, old = prepare_gate("run", baseline, max_slowdown, max_memory_growth, tolerance)
    ui = UI()
    with ui.status(f"a {steps}-step toy-{task} run"):
        result = bench_run(task, steps, seed)
    (row,) = result["rows"]
    labels = {"loss_first": "loss at step 1", "loss_last": f"loss at step {steps}", "topk_mass_last": "top-k mass",
              "accuracy_after": "accuracy after", "accuracy_with_context_after": "with context after"}
    ui.table(f"opcd bench run: toy-{task}, {steps} steps",
             ["number", "value"],
             [[label, f"{row[key]:.4g}" if row[key] is not None else "-"] for key, label in labels.items()]
             + [["seconds per step", f"{row['step_s']:.3f}"], ["per step / yardstick", f"{row['step_over_calibration']:.2f}x"],
                ["peak MiB", f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "-"]])
    code = finish_gate(result, ui, limits, old, save_baseline, baseline)
    if json_output:
        print_json(result)
    return code
