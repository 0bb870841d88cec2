"""The paper's results table in miniature, on the toy world, in one command.

    python bench/paper_table.py --out bench/paper_table

Rows: the base student without and with the context; off-policy context distillation; OPCD; OPCD with the
consistency regulariser (the paper's form, from step 1, and held back to step 31, the toy's recorded
settings); OPCD with the in-context anchor (`--anchor-weight 1`); OPCD over the union of the student's and the
teacher's top-k (`--topk-support union`); OPCD with an EMA teacher and with a live teacher (`--teacher-kind
ema|live`); cross-size OPCD (the larger toy model as teacher); the other objectives in OPCD's place
(`--objective sampled-token|topk-forward-kl|jsd`); and, on `codes` and `recall` only, OPCD with 4 samples per
prompt, without and with the verifier's reward (`--samples-per-prompt 4 --reward-weight 1`, and 0.1); and on those
two, the context in the user's turn (`--context-as user-prefix`) without a remedy and with opcd's default there
(the consistency regulariser from the second half; "with context" puts the context in the user's turn too). Columns: test accuracy (without the context
for trained students; in the row's condition for the base rows), accuracy with the context, OOD accuracy (each
OOD row with its own context), context harm (share of test items solved without the context but failed with
it), mean response tokens, the student's mean entropy at its response tokens over the last 5 steps (nats;
trained rows), and how much the loss moves from step to step over the second half. By default the toy tasks
`shift` (a system prompt) and `codes` (experience items); `--tasks recall --out bench/paper_table_recall` runs
the task of several dependent steps on its own (all three at once would pass the 30 minutes this script is
allowed on a 2-core CPU). Every trained row is the mean and standard deviation over seeds.

`--rows ROW ...` runs only those rows and puts their runs into the saved OUT.json in place of the old ones
(each run is seeded as in a full run); `--render OUT.json` writes the table and the plot again
from saved runs.

Writes OUT.md (the table), OUT.json (every run's numbers) and OUT.png (learning curves: the distillation loss
per step, mean over seeds). Needs matplotlib (`pip install -e ".[bench]"`).
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

from opcd_cli.config import build_distill_config, read_recipe
from opcd_cli.distill import distill
from opcd_cli.ui import UI

CONSISTENCY_WEIGHT = 0.02  # LAMBDA of the "OPCD + consistency" row unless --consistency-weight says otherwise
METHODS = {  # row name -> settings on top of the toy recipe
    "off-policy context distillation": {"mode": "off-policy"},
    "OPCD": {},
    "OPCD + consistency": {"consistency_weight": CONSISTENCY_WEIGHT},
    "OPCD + consistency from step 31": {"consistency_weight": CONSISTENCY_WEIGHT, "consistency_start": 31},
    "OPCD + in-context anchor": {"anchor_weight": 1.0},
    "OPCD, union support": {"topk_support": "union"},
    "OPCD, EMA teacher": {"teacher_kind": "ema"},
    "OPCD, live teacher": {"teacher_kind": "live"},
    "OPCD, cross-size (large teacher)": {"teacher": "toy:large"},
    # the objectives the peers offer, in OPCD's place (--objective), and the verifier's reward beside it
    "sampled-token reverse KL": {"objective": "sampled-token"},
    "top-k forward KL (teacher's top-k)": {"objective": "topk-forward-kl"},
    "JSD, beta 0.5": {"objective": "jsd"},
    "OPCD, 4 samples per prompt": {"samples_per_prompt": 4},
    "OPCD + reward, 4 samples per prompt": {"samples_per_prompt": 4, "reward_weight": 1.0},
    "OPCD + reward 0.1, 4 samples per prompt": {"samples_per_prompt": 4, "reward_weight": 0.1},
    # the context in the user's turn: without a remedy, and with opcd's default there (bench/placement_study.py)
    "OPCD, context in the user's turn, no regulariser": {"context_as": "user-prefix", "user_prefix_consistency": False},
    "OPCD, context in the user's turn (default: regulariser from step 31)": {"context_as": "user-prefix"},
}
ONLY_ON = {row: ("codes", "recall") for row in METHODS if "samples per prompt" in row or "user's turn" in row}
# rows run on some tasks only: groups of four cost four times the rollouts; in the user's turn the toy student
# cannot apply `shift`'s rule at all (0% with the context there, before training: nothing to distil)
COLUMNS = ["test accuracy", "with context", "OOD", "context harm", "response tokens", "student entropy, last 5 steps",
           "loss step to step, 2nd half", "same, over the loss"]


def loss_jitter(curve: list[float]) -> tuple[float, float]:
    """How much the per-step loss moves over the second half of a run: the mean |loss[t+1] - loss[t]|, alone and
    over the mean loss of those steps (teachers give losses of different sizes)."""
    half = curve[len(curve) // 2:]
    moved = statistics.mean(abs(b - a) for a, b in zip(half, half[1:]))
    return moved, moved / statistics.mean(half)


def run_job(job: dict) -> dict:
    """One run in a worker process (one thread each: the workers share the machine's cores)."""
    import torch

    torch.set_num_threads(1)
    try:
        return run_one(**job)
    except Exception as e:  # a plain error the pool can hand back (an OpcdError does not pickle): no hang
        raise RuntimeError(f"{job['task']} {job['method']} seed {job['seed']}: {type(e).__name__}: {e}") from None


def run_one(task: str, method: str, settings: dict, seed: int, work: Path, eval_before: bool) -> dict:
    cfg = build_distill_config(read_recipe(f"toy-{task}"), settings, {
        "seed": seed, "eval_before": eval_before,
        "output_dir": str(work / f"{task}-{method.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}-{seed}"),
    })
    summary = distill(cfg, UI(quiet=True))
    steps = [json.loads(line) for line in Path(summary["output_dir"], "metrics.jsonl").read_text().splitlines()]
    entropy = statistics.mean(m["student_entropy"] for m in steps[-5:])
    return summary | {"task": task, "method": method, "seed": seed, "curve": [m["distill_loss"] for m in steps],
                      "final_student_entropy": entropy}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def percent_mean_std(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f}%" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}%"


def table(runs: list[dict], tasks: list[str]) -> str:
    """Rows read from the runs' ``EvalResult``s (``before`` of the base student, ``after`` of each method)."""
    lines = []
    for task in tasks:
        rows = [r for r in runs if r["task"] == task]
        base = next(r["before"] for r in rows if r["before"] is not None)
        lines += [f"### Task `{task}`", "", "| row | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        harm, ood = percent_mean_std([base["context_harm"]]), percent_mean_std([base["ood_accuracy"]])
        with_context = percent_mean_std([base["accuracy_with_context"]])
        lines.append(f"| base student, without context | {percent_mean_std([base['accuracy']])} | {with_context} | "
                     f"{ood} | {harm} | {base['mean_response_tokens']:.2f} | | | |")
        lines.append(f"| base student, with context | {with_context} | {with_context} | {ood} | {harm} | "
                     f"{base['mean_response_tokens_with_context']:.2f} | | | |")
        for method in METHODS:
            got = [r["after"] for r in rows if r["method"] == method]
            if not got:  # a row not run on this task
                continue
            lines.append(
                f"| {method} | {percent_mean_std([a['accuracy'] for a in got])} | "
                f"{percent_mean_std([a['accuracy_with_context'] for a in got])} | "
                f"{percent_mean_std([a['ood_accuracy'] for a in got])} | "
                f"{percent_mean_std([a['context_harm'] for a in got])} | "
                f"{mean_std([a['mean_response_tokens'] for a in got])} | "
                f"{mean_std([r['final_student_entropy'] for r in rows if r['method'] == method])} | "
                f"{mean_std([loss_jitter(r['curve'])[0] for r in rows if r['method'] == method])} | "
                f"{mean_std([loss_jitter(r['curve'])[1] for r in rows if r['method'] == method])} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in METHODS:
            curves = [r["curve"] for r in runs if r["task"] == task and r["method"] == method]
            if not curves:
                continue
            mean = [statistics.mean(step) for step in zip(*curves)]
            ax.plot(range(1, len(mean) + 1), mean, label=method)
        ax.set_title(f"toy task `{task}`")
        ax.set_xlabel("step")
        ax.set_ylabel("distillation loss (per token)")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/paper_table"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["shift", "codes"])
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--consistency-weight", type=float, default=CONSISTENCY_WEIGHT,
                        help="LAMBDA of the OPCD + consistency row (at 0.1 and 1 it disrupted the toy student)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="write OUT.md and OUT.png from the runs saved in an earlier OUT.json; run nothing")
    parser.add_argument("--rows", nargs="+", metavar="ROW", choices=list(METHODS),
                        help="run only these rows and put their runs into OUT.json in place of the saved ones")
    args = parser.parse_args()
    if args.render:
        runs = json.loads(args.render.read_text())["runs"]
        markdown = table(runs, args.tasks)
        Path(f"{args.out}.md").write_text(markdown + "\n")
        plot(runs, args.tasks, Path(f"{args.out}.png"))
        print(markdown)
        return
    METHODS["OPCD + consistency"] = {"consistency_weight": args.consistency_weight}
    start = time.time()
    runs = []
    with tempfile.TemporaryDirectory() as work:
        jobs = [{"task": task, "method": method, "settings": METHODS[method], "seed": seed, "work": Path(work),
                 "eval_before": seed == 0 and method == "OPCD"}
                for task in args.tasks for seed in range(args.seeds) for method in (args.rows or METHODS)
                if task in ONLY_ON.get(method, (task,))]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for run in pool.imap_unordered(run_job, jobs):
                runs.append(run)
                print(f"{time.time() - start:6.0f}s  {run['task']:8s} seed {run['seed']}  {run['method']:34s} "
                      f"no-context {run['after']['accuracy']:.3f}", file=sys.stderr, flush=True)
    seconds, reruns = round(time.time() - start), []
    if args.rows:  # the saved runs of the other rows stay
        saved = json.loads(Path(f"{args.out}.json").read_text())
        runs += [r for r in saved["runs"] if r["method"] not in args.rows]
        reruns = saved.get("reruns", []) + [{"rows": args.rows, "seconds": seconds}]
        seconds = saved["seconds"]
    order = list(METHODS)
    runs.sort(key=lambda r: (args.tasks.index(r["task"]), r["seed"], order.index(r["method"])))
    markdown = table(runs, args.tasks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(markdown + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"seconds": seconds, "runs": runs} | (
        {"reruns": reruns} if reruns else {}), indent=1) + "\n")
    plot(runs, args.tasks, Path(f"{args.out}.png"))
    print(markdown)
    print(f"\nconsistency weight {args.consistency_weight}; {len(jobs)} runs in {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
