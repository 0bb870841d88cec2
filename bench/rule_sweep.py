"""Every toy word rule distilled from its own system prompt, with one recipe: the rule-family sweep.

    python bench/rule_sweep.py --out bench/rule_sweep                          # the toy-shift recipe
    python bench/rule_sweep.py --out /tmp/tail --set topk_tail=true --modes on-policy   # a variant
    python bench/rule_sweep.py --compare bench/rule_sweep.json /tmp/tail.json          # variants side by side

For each word rule of the toy world (``opcd_cli.toy.tasks.RULES``): 512 training prompts, 100 test rows and
the rule's system prompt as the context; OOD rows are 10 words of every other rule, each with that rule's own
system prompt. Every run takes the settings of the `toy-shift` recipe (or ``--recipe``) with the rule's data,
plus the ``--set key=value`` changes (values read as JSON, else as text), on-policy and off-policy, for
``--seeds`` seeds, in this process's children, ``--workers`` at a time (one thread each).

Per rule and mode: no-context accuracy before and after, the teacher with the context, OOD before and after,
context harm after, and the student's mean top-k mass at the last step and its lowest (on-policy; off-policy
the loss is over the teacher's top-k). Greedy evaluation before training is the same for every seed and mode,
so it runs once per rule. Writes OUT.md (the table), OUT.json (every run) and OUT.png (the plot).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

TEST_ROWS, OOD_PER_RULE = 100, 10


def write_rule_files(rule: str, folder: Path) -> dict[str, str]:
    from opcd_cli.toy import world

    splits = world.rule_splits(rule, test=TEST_ROWS, ood_per_kind=OOD_PER_RULE)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"data": folder / "train.jsonl", "eval_data": folder / "test.jsonl", "ood_data": folder / "ood.jsonl",
             "context": folder / "context.txt"}
    for key, rows in (("data", splits.train), ("eval_data", splits.test), ("ood_data", splits.ood)):
        files[key].write_text("".join(json.dumps(row) + "\n" for row in rows))
    files["context"].write_text(splits.context + "\n")
    return {key: str(path) for key, path in files.items()}


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from opcd_cli.config import build_distill_config, read_recipe
    from opcd_cli.distill import distill
    from opcd_cli.ui import UI

    recipe = read_recipe(job["recipe"])
    recipe = {k: v for k, v in recipe.items() if k not in ("data", "context", "eval_data", "ood_data")}
    cfg = build_distill_config(recipe, job["files"], job["changes"], {
        "mode": job["mode"], "seed": job["seed"], "eval_before": job["eval_before"], "student": "toy:small",
        "output_dir": job["output_dir"], "show_prompts": 0, "min_topk_mass": 0.0,
    })
    start = time.time()
    summary = distill(cfg, UI(quiet=True))
    lines = Path(cfg.output.output_dir, "metrics.jsonl").read_text().splitlines()
    masses = [json.loads(line)["topk_mass"] for line in lines]
    return {"rule": job["rule"], "mode": job["mode"], "seed": job["seed"], "seconds": round(time.time() - start, 1),
            "before": summary["before"], "after": summary["after"], "topk_mass": masses}


def parse_changes(pairs: list[str]) -> dict:
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            changes[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            changes[key.strip().replace("-", "_")] = value
    return changes


def pct(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def table(runs: list[dict], rules: list[str], modes: list[str]) -> str:
    head = ["rule", "teacher, context", "before, no context"]
    for mode in modes:
        short = "OPCD" if mode == "on-policy" else "off-policy"
        head += [f"{short} after"]
    head += ["OOD before"] + [f"{'OPCD' if m == 'on-policy' else 'off-policy'} OOD after" for m in modes]
    head += [f"{'OPCD' if m == 'on-policy' else 'off-policy'} harm" for m in modes]
    if "on-policy" in modes:
        head += ["OPCD top-k mass, last (lowest)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for rule in rules:
        rows = [r for r in runs if r["rule"] == rule]
        before = next(r["before"] for r in rows if r["before"] is not None)
        cells = [f"`{rule}`", pct([before["teacher_accuracy_with_context"]]), pct([before["accuracy"]])]
        by_mode = {m: [r for r in rows if r["mode"] == m] for m in modes}
        cells += [pct([r["after"]["accuracy"] for r in by_mode[m]]) for m in modes]
        cells += [pct([before["ood_accuracy"]])] + [pct([r["after"]["ood_accuracy"] for r in by_mode[m]]) for m in modes]
        cells += [pct([r["after"]["context_harm"] for r in by_mode[m]]) for m in modes]
        if "on-policy" in modes:
            on = by_mode["on-policy"]
            cells.append(f"{statistics.mean(r['topk_mass'][-1] for r in on):.3f} "
                         f"({min(min(r['topk_mass']) for r in on):.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(runs: list[dict], rules: list[str], points: float = 0.10) -> dict:
    """Per rule, on-policy: whether the mean no-context accuracy after is within ``points`` of the teacher with
    the context, and OOD falls by at most ``points`` (the recipe target)."""
    out = {}
    for rule in rules:
        on = [r for r in runs if r["rule"] == rule and r["mode"] == "on-policy"]
        if not on:
            continue
        before = next(r["before"] for r in runs if r["rule"] == rule and r["before"] is not None)
        after = statistics.mean(r["after"]["accuracy"] for r in on)
        ood = statistics.mean(r["after"]["ood_accuracy"] for r in on)
        out[rule] = {"learned": after >= before["teacher_accuracy_with_context"] - points,
                     "ood_kept": ood >= before["ood_accuracy"] - points}
    return out


def compare(reports: list[Path]) -> str:
    """On-policy, rule by rule: no-context accuracy after and OOD after (means over seeds) of several sweeps'
    OUT.json, one column pair per sweep, with the rules that meet the recipe target counted."""
    loaded = [json.loads(path.read_text()) for path in reports]
    names = [", ".join(f"{k}={v}" for k, v in r["changes"].items()) or r["recipe"] for r in loaded]
    rules = list(dict.fromkeys(run["rule"] for r in loaded for run in r["runs"]))
    head = ["rule", "teacher", "OOD before"] + [f"{n}: after / OOD" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for rule in rules:
        before = next(run["before"] for r in loaded for run in r["runs"] if run["rule"] == rule and run["before"])
        cells = [f"`{rule}`", pct([before["teacher_accuracy_with_context"]]), pct([before["ood_accuracy"]])]
        for r in loaded:
            on = [run for run in r["runs"] if run["rule"] == rule and run["mode"] == "on-policy"]
            cells.append(f"{pct([x['after']['accuracy'] for x in on])} / {pct([x['after']['ood_accuracy'] for x in on])}"
                         if on else "")
        lines.append("| " + " | ".join(cells) + " |")
    met = [sum(v["learned"] and v["ood_kept"] for v in r["verdict"].values()) for r in loaded]
    lines.append("| rules meeting the target | | | " + " | ".join(f"{m} of {len(r['verdict'])}"
                                                            for m, r in zip(met, loaded)) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], rules: list[str], modes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    width = 0.8 / (1 + len(modes))
    x = range(len(rules))
    before = {rule: next(r["before"] for r in runs if r["rule"] == rule and r["before"] is not None) for rule in rules}
    for ax, key, title in ((axes[0], "accuracy", "no-context accuracy (teacher with context: x)"),
                           (axes[1], "ood_accuracy", "OOD accuracy (other rules, own prompts)")):
        ax.bar([i - 0.4 + width / 2 for i in x], [before[r][key] for r in rules], width, label="before")
        for j, mode in enumerate(modes):
            means = [statistics.mean(r["after"][key] for r in runs if r["rule"] == rule and r["mode"] == mode)
                     for rule in rules]
            ax.bar([i - 0.4 + width * (j + 1.5) for i in x], means, width, label=f"{mode}, after")
        if key == "accuracy":
            ax.scatter(list(x), [before[r]["teacher_accuracy_with_context"] for r in rules], marker="x", color="k",
                       zorder=3, label="teacher, with context")
        ax.set_xticks(list(x), rules, rotation=30)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    for rule in rules:
        curves = [r["topk_mass"] for r in runs if r["rule"] == rule and r["mode"] == "on-policy"]
        if curves:
            axes[2].plot(range(1, len(curves[0]) + 1), [statistics.mean(s) for s in zip(*curves)], label=rule)
    axes[2].set_title("on-policy: student's top-k mass per step (mean over seeds)", fontsize=10)
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from opcd_cli.toy import tasks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/rule_sweep"))
    parser.add_argument("--recipe", default="toy-shift")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--modes", nargs="+", default=["on-policy", "off-policy"])
    parser.add_argument("--rules", nargs="+", default=list(tasks.RULES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare", nargs="+", type=Path, metavar="OUT.json",
                        help="print the on-policy results of earlier sweeps side by side, and run nothing")
    args = parser.parse_args()
    if args.compare:
        print(compare(args.compare))
        return
    changes = parse_changes(args.changes)
    start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        jobs = []
        for rule in args.rules:
            files = write_rule_files(rule, work / "data" / rule)
            for seed in range(args.seeds):
                for mode in args.modes:
                    jobs.append({"rule": rule, "mode": mode, "seed": seed, "files": files, "changes": changes,
                                 "recipe": args.recipe, "eval_before": seed == 0 and mode == args.modes[0],
                                 "output_dir": str(work / "runs" / f"{rule}-{mode}-{seed}")})
        runs = []
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for run in pool.imap_unordered(run_one, jobs):
                runs.append(run)
                print(f"{time.time() - start:6.0f}s  {run['rule']:7s} {run['mode']:10s} seed {run['seed']}  "
                      f"no-context {run['after']['accuracy']:.2f}  OOD {run['after']['ood_accuracy']:.2f}  "
                      f"top-k mass {run['topk_mass'][-1]:.3f}", file=sys.stderr, flush=True)
    runs.sort(key=lambda r: (args.rules.index(r["rule"]), r["mode"], r["seed"]))
    seconds = round(time.time() - start)
    markdown = table(runs, args.rules, args.modes)
    report = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, Python "
                         f"{platform.python_version()}, {multiprocessing.cpu_count()} cores",
              "recipe": args.recipe, "changes": changes, "seeds": args.seeds, "workers": args.workers,
              "seconds": seconds, "verdict": verdict(runs, args.rules), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(markdown + "\n")
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(runs, args.rules, args.modes, Path(f"{args.out}.png"))
    print(markdown)
    print(f"\n{args.recipe} {changes}; {len(runs)} runs in {seconds} s", file=sys.stderr)


if __name__ == "__main__":
    main()
