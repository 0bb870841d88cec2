"""What the context-removability regulariser does, step by step, on the toy world.

    python bench/consistency_study.py --out bench/consistency_study

The regulariser ("When Context Returns", 2026; `--consistency-weight LAMBDA`) adds LAMBDA * KL(stopgrad p(. | x,
y<t) || p(. | c, x, y<t)) over the response tokens of the student's own samples: the student with the context
is pulled towards the student without it. On the toy it raised the context harm instead of lowering it. This
script tests why. Each variant is a toy run (the `toy-TASK` recipe, 60 steps) with a checkpoint every 10 steps;
every checkpoint is scored on the eval split without and with the context and on the OOD split, so the table
shows the no-context accuracy, the with-context accuracy and the context harm as training goes; each step's
unweighted term (`consistency_loss / consistency_weight` in `metrics.jsonl`) shows what the term saw. Variants:

* OPCD with LAMBDA = 1e-6: the term is computed and logged but moves nothing (the reference);
* the paper's form, LAMBDA = 0.02 from step 1;
* the same weight from step 31 (`--consistency-start 31`: once the no-context student has learned);
* the same weight rising over steps 1 to 30 (`--consistency-warmup 30`);
* LAMBDA = 0.002 (is the weight too large for the toy?);
* LAMBDA = 0.02 over the union of both sides' top-k (`--topk-support union`: is the support the problem?).

Writes OUT.json (every checkpoint's scores and every step's metrics), OUT.md (the tables) and OUT.png.
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

WEIGHT = 0.02
VARIANTS = {  # name -> settings on top of the toy recipe
    "OPCD (term logged only, weight 1e-6)": {"consistency_weight": 1e-6},
    f"paper's form, weight {WEIGHT}": {"consistency_weight": WEIGHT},
    f"weight {WEIGHT} from step 31": {"consistency_weight": WEIGHT, "consistency_start": 31},
    f"weight {WEIGHT}, warm-up over steps 1-30": {"consistency_weight": WEIGHT, "consistency_warmup": 30},
    "weight 0.002": {"consistency_weight": 0.002},
    f"weight {WEIGHT}, union support": {"consistency_weight": WEIGHT, "topk_support": "union"},
}
EVERY = 10


def run_job(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # the workers share the machine's cores
    return run_one(**job)


def run_one(task: str, variant: str, seed: int, work: Path) -> dict:
    recipe = read_recipe(f"toy-{task}")
    folder = work / f"{task}-{list(VARIANTS).index(variant)}-{seed}"
    cfg = build_distill_config(recipe, VARIANTS[variant], {"seed": seed, "eval_before": False, "save_every": EVERY,
                                                           "output_dir": str(folder)})
    distill(cfg, UI(quiet=True))
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    scored = evaluate(EvalConfig(models=tuple(str(p) for p in checkpoints_of(folder)), data=recipe["eval_data"],
                                 context=recipe["context"], ood_data=recipe["ood_data"],
                                 batch_size=recipe["eval_batch_size"],
                                 sampling=SamplingOptions(temperature=0.0, max_new_tokens=recipe["max_new_tokens"])))
    checkpoints = [{"step": (i + 1) * EVERY, **{k: r[k] for k in ("accuracy", "accuracy_with_context", "context_harm",
                                                                  "ood_accuracy")}} for i, r in enumerate(scored)]
    return {"task": task, "variant": variant, "seed": seed, "checkpoints": checkpoints,
            "steps": [{k: m.get(k) for k in ("step", "distill_loss", "consistency_loss", "consistency_weight",
                                             "student_entropy")} for m in steps]}


def term(step: dict) -> float:
    """The step's unweighted regulariser (per response token); None while its weight is 0."""
    return step["consistency_loss"] / step["consistency_weight"] if step["consistency_weight"] else None


def cell(values: list[float], percent: bool = True) -> str:
    scale = 100 if percent else 1
    mean = scale * statistics.mean(values)
    spread = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}" if percent else f"{mean:.3f} ± {spread:.3f}"


def tables(runs: list[dict], tasks: list[str]) -> str:
    lines = []
    for task in tasks:
        steps = sorted({c["step"] for r in runs for c in r["checkpoints"]})
        for key, title in (("accuracy", "no-context accuracy"), ("accuracy_with_context", "with-context accuracy"),
                           ("context_harm", "context harm"), ("ood_accuracy", "OOD accuracy")):
            lines += [f"### `{task}`: {title} (%) at each checkpoint", "",
                      "| variant | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
            for variant in VARIANTS:
                got = [r for r in runs if r["task"] == task and r["variant"] == variant]
                lines.append(f"| {variant} | " + " | ".join(
                    cell([next(c[key] for c in r["checkpoints"] if c["step"] == s) for r in got]) for s in steps) + " |")
            lines.append("")
        windows = [(1, 10), (11, 20), (21, 30), (31, 40), (41, 50), (51, 60)]
        lines += [f"### `{task}`: the unweighted term per response token, mean over each 10 steps", "",
                  "| variant | " + " | ".join(f"steps {a}-{b}" for a, b in windows) + " |", "|---" * (len(windows) + 1) + "|"]
        for variant in VARIANTS:
            got = [r for r in runs if r["task"] == task and r["variant"] == variant]
            row = []
            for a, b in windows:
                values = [term(s) for r in got for s in r["steps"] if a <= s["step"] <= b and term(s) is not None]
                row.append(f"{statistics.mean(values):.3f}" if values else "off")
            lines.append(f"| {variant} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("accuracy", "no-context accuracy"), ("accuracy_with_context", "with-context accuracy"),
            ("context_harm", "context harm"))
    fig, axes = plt.subplots(len(tasks), len(keys) + 1, figsize=(5 * (len(keys) + 1), 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for colour, variant in enumerate(VARIANTS):
            got = [r for r in runs if r["task"] == task and r["variant"] == variant]
            steps = [c["step"] for c in got[0]["checkpoints"]]
            for ax, (key, title) in zip(row, keys):
                mean = [statistics.mean(c[key] for r in got for c in r["checkpoints"] if c["step"] == s) for s in steps]
                ax.plot(steps, mean, marker="o", color=f"C{colour}", label=variant)
                ax.set_title(f"`{task}`: {title}")
                ax.set_xlabel("step")
            per_step = [statistics.mean(t for t in (term(r["steps"][i]) for r in got) if t is not None)
                        if any(term(r["steps"][i]) is not None for r in got) else float("nan")
                        for i in range(len(got[0]["steps"]))]
            row[-1].plot(range(1, len(per_step) + 1), per_step, color=f"C{colour}", label=variant)
            row[-1].set_title(f"`{task}`: the unweighted term")
            row[-1].set_xlabel("step")
            row[-1].set_yscale("log")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/consistency_study"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["shift", "codes"])
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
                    for task in args.tasks for seed in range(args.seeds) for variant in VARIANTS]
            with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
                for run in pool.imap_unordered(run_job, jobs):
                    runs.append(run)
                    last = run["checkpoints"][-1]
                    print(f"{time.time() - start:6.0f}s  {run['task']:6s} seed {run['seed']}  {run['variant']:42s} "
                          f"no-context {last['accuracy']:.3f} harm {last['context_harm']:.3f}", file=sys.stderr, flush=True)
        order = list(VARIANTS)
        runs.sort(key=lambda r: (args.tasks.index(r["task"]), r["seed"], order.index(r["variant"])))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({"seconds": round(time.time() - start), "runs": runs}, indent=1) + "\n")
    markdown = tables(runs, args.tasks)
    Path(f"{args.out}.md").write_text(markdown + "\n")
    plot(runs, args.tasks, Path(f"{args.out}.png"))
    print(markdown)
    print(f"{len(runs)} runs in {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
