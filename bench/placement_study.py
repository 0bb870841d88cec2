"""The context put back in the user's turn, step by step, on the toy world: why it harms, and what removes the harm.

    python bench/placement_study.py --out bench/placement_study
    python bench/placement_study.py --variants "user-prefix: OPCD" --tasks codes --seeds 1 --out /tmp/one

With `--context-as user-prefix` (the paper's placement for experience on math) the distilled student answers
right without the context and wrongly with it. Each variant is a toy run (the `toy-TASK` recipe, 60 steps) with
a checkpoint every 10 steps; every checkpoint is scored on the eval split without and with the context (in the
run's placement) and on the OOD split, so the tables show no-context accuracy, with-context accuracy and context
harm as training goes. For the final model, the first wrong answers it gives with the context back are kept
(`examples` in OUT.json), to read what the student writes, not only its score. Variants: the placement, OPCD
alone, and remedies (the in-context anchor at several weights and schedules, the regulariser).

Writes OUT.json (every checkpoint's scores, every step's metrics, the examples), OUT.md (the tables), OUT.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

from opcd_cli.config import EvalConfig, SamplingOptions, build_distill_config, read_recipe
from opcd_cli.distill import distill
from opcd_cli.evaluate import checkpoints_of, evaluate
from opcd_cli.ui import UI

USER = {"context_as": "user-prefix", "user_prefix_consistency": False}  # opcd's default remedy off: each variant says
VARIANTS = {  # name -> settings on top of the toy recipe; what runs
    "system: OPCD": {},
    "user-prefix: OPCD": USER,
    "user-prefix: anchor 1": USER | {"anchor_weight": 1.0},
    "user-prefix: anchor 1 from step 31": USER | {"anchor_weight": 1.0, "anchor_start": 31},
    "user-prefix: anchor 1, warm-up over steps 1-30": USER | {"anchor_weight": 1.0, "anchor_warmup": 30},
    "user-prefix: anchor 0.1": USER | {"anchor_weight": 0.1},
    "user-prefix: consistency 0.02 from step 31 (opcd's default)": {"context_as": "user-prefix"},
    "user-prefix: anchor 2, warm-up over steps 1-30": USER | {"anchor_weight": 2.0, "anchor_warmup": 30},
    "user-prefix: anchor 1, warm-up over steps 1-30, and consistency 0.02 from step 31": USER | {
        "anchor_weight": 1.0, "anchor_warmup": 30, "consistency_weight": 0.02, "consistency_start": 31},
    "system: anchor 1 from step 31": {"anchor_weight": 1.0, "anchor_start": 31},
}
EVERY = 10
EXAMPLES = 3  # wrong answers kept per run, with the context back


def run_job(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # the workers share the machine's cores
    try:
        return run_one(**job)
    except Exception as e:  # a plain error the pool can hand back
        raise RuntimeError(f"{job['task']} {job['variant']} seed {job['seed']}: {type(e).__name__}: {e}") from None


def wrong_with_context(folder: Path, recipe: dict, context_as: str) -> list[dict]:
    """The final student's first wrong answers to eval rows with the context back, greedy."""
    import torch

    from opcd_cli import models
    from opcd_cli.config import FieldOptions
    from opcd_cli.data import load_examples, read_context
    from opcd_cli.prompts import ChatRenderer, with_context
    from opcd_cli.verifiers import is_correct

    model, tokenizer = models.load_model(str(folder)).eval(), models.load_tokenizer(str(folder))
    renderer, context = ChatRenderer(tokenizer, str(folder)), read_context(recipe["context"])
    wrong = []
    for example in load_examples(recipe["eval_data"], fields=FieldOptions(), say=lambda *a: None)[:64]:
        ids = renderer.prompt_ids(with_context(example.messages, example.context or context, context_as))
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=recipe["max_new_tokens"], do_sample=False)
        text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        if not is_correct(text, example.answer, example.verifier, "auto"):
            wrong.append({"prompt": example.messages[-1][1], "answer": example.answer, "with_context": text})
            if len(wrong) == EXAMPLES:
                break
    return wrong


def run_one(task: str, variant: str, seed: int, work: Path) -> dict:
    recipe = read_recipe(f"toy-{task}")
    folder = work / f"{task}-{list(VARIANTS).index(variant)}-{seed}"
    settings = VARIANTS[variant]
    cfg = build_distill_config(recipe, settings, {"seed": seed, "eval_before": False, "save_every": EVERY,
                                                  "output_dir": str(folder)})
    summary = distill(cfg, UI(quiet=True))
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    context_as = settings.get("context_as", "system")
    scored = evaluate(EvalConfig(models=tuple(str(p) for p in checkpoints_of(folder)), data=recipe["eval_data"],
                                 context=recipe["context"], context_as=context_as, ood_data=recipe["ood_data"],
                                 batch_size=recipe["eval_batch_size"],
                                 sampling=SamplingOptions(temperature=0.0, max_new_tokens=recipe["max_new_tokens"])))
    checkpoints = [{"step": (i + 1) * EVERY, **{k: r[k] for k in ("accuracy", "accuracy_with_context", "context_harm",
                                                                  "ood_accuracy")}} for i, r in enumerate(scored)]
    return {"task": task, "variant": variant, "seed": seed, "checkpoints": checkpoints,
            "train_seconds": summary["train_seconds"], "step_seconds": summary["time_by_phase"]["step_seconds"],
            "examples": wrong_with_context(folder, recipe, context_as),
            "steps": [{k: m.get(k) for k in ("step", "distill_loss", "anchor_loss", "consistency_loss",
                                             "student_entropy")} for m in steps]}


def cell(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def tables(runs: list[dict], tasks: list[str]) -> str:
    lines = []
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    for task in tasks:
        steps = sorted({c["step"] for r in runs if r["task"] == task for c in r["checkpoints"]})
        for key, title in (("accuracy", "no-context accuracy"), ("accuracy_with_context", "with-context accuracy"),
                           ("context_harm", "context harm"), ("ood_accuracy", "OOD accuracy")):
            lines += [f"### `{task}`: {title} (%) at each checkpoint", "",
                      "| variant | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
            for variant in variants:
                got = [r for r in runs if r["task"] == task and r["variant"] == variant]
                if got:
                    lines.append(f"| {variant} | " + " | ".join(
                        cell([next(c[key] for c in r["checkpoints"] if c["step"] == s) for r in got]) for s in steps)
                        + " |")
            lines.append("")
        lines += [f"### `{task}`: seconds per training step (mean over seeds)", "", "| variant | seconds |", "|---|---|"]
        for variant in variants:
            got = [r["step_seconds"] for r in runs if r["task"] == task and r["variant"] == variant]
            if got:
                lines.append(f"| {variant} | {statistics.mean(got):.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("accuracy", "no-context accuracy"), ("accuracy_with_context", "with-context accuracy"),
            ("context_harm", "context harm"))
    fig, axes = plt.subplots(len(tasks), len(keys), figsize=(5 * len(keys), 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for colour, variant in enumerate(VARIANTS):
            got = [r for r in runs if r["task"] == task and r["variant"] == variant]
            if not got:
                continue
            steps = [c["step"] for c in got[0]["checkpoints"]]
            for ax, (key, title) in zip(row, keys):
                mean = [statistics.mean(c[key] for r in got for c in r["checkpoints"] if c["step"] == s) for s in steps]
                ax.plot(steps, mean, marker="o", color=f"C{colour}", label=variant)
                ax.set_title(f"`{task}`: {title}")
                ax.set_xlabel("step")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/placement_study"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["codes", "shift", "recall"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--render", type=Path, metavar="JSON", help="write OUT.md and OUT.png from a saved OUT.json")
    args = parser.parse_args()
    start = time.time()
    if args.render:
        runs = json.loads(args.render.read_text())["runs"]
    else:
        runs = []
        with tempfile.TemporaryDirectory() as work:
            jobs = [{"task": task, "variant": variant, "seed": seed, "work": Path(work)}
                    for task in args.tasks for seed in range(args.seeds) for variant in args.variants]
            with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
                for run in pool.imap_unordered(run_job, jobs):
                    runs.append(run)
                    last = run["checkpoints"][-1]
                    print(f"{time.time() - start:6.0f}s  {run['task']:6s} seed {run['seed']}  {run['variant']:48s} "
                          f"no-context {last['accuracy']:.3f} with {last['accuracy_with_context']:.3f} "
                          f"harm {last['context_harm']:.3f} OOD {last['ood_accuracy']:.3f}", file=sys.stderr, flush=True)
        order = list(VARIANTS)
        runs.sort(key=lambda r: (args.tasks.index(r["task"]), r["seed"], order.index(r["variant"])))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({"seconds": round(time.time() - start), "runs": runs},
                                                       indent=1) + "\n")
    markdown = tables(runs, args.tasks)
    Path(f"{args.out}.md").write_text(markdown + "\n")
    plot(runs, args.tasks, Path(f"{args.out}.png"))
    print(markdown)
    print(f"{len(runs)} runs in {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
