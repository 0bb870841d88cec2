"""On-policy against off-policy distillation, and cross-size, on the toy task of several dependent steps.

    python bench/recall_runs.py --out bench/recall_runs

The `recall` task (``opcd_cli/toy/world.py``): the context is a table of codes (``Codes: B1 D8 G1 ...``), the
prompt asks for three to five of them in some order (``Recall: K D M``), and the answer writes each key with its
code in that order (``K9 D8 M6``), every step read off what was written before it. Rows (each the built-in
recipe ``toy-recall`` with the change shown, several seeds): OPCD; off-policy context distillation (the
student trained on the teacher's own answers with the context, forward KL over the teacher's top-k); and both
again with ``toy:large`` as the teacher (cross-size).

Besides the usual accuracies, each trained student answers the test prompts without the context twice, greedily
and sampled at temperature 1 (the rollouts' temperature), and every answer is cut into its steps (``K9``):

* step accuracy by position;
* a step's accuracy after a slip (some earlier step wrong) against its accuracy after none: when slips
  compound, the first is lower;
* out of step: answers whose keys are not the ones asked, in order (a key skipped, repeated or made up).

Writes OUT.json (every run) and OUT.md (the tables). Runs ``--workers`` at a time, one thread each.
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

METHODS = {
    "OPCD": {},
    "off-policy": {"mode": "off-policy"},
    "OPCD, toy:large teacher": {"teacher": "toy:large"},
    "off-policy, toy:large teacher": {"mode": "off-policy", "teacher": "toy:large"},
}


def slips(responses: list[str], rows: list[dict]) -> dict:
    """Step-by-step scores of ``responses`` to the ``rows`` (each with its ``prompt`` and ``answer``)."""
    by_position: list[list[bool]] = [[] for _ in range(5)]  # recall questions ask for 3 to 5 keys
    after_slip, after_none, out_of_step, exact = [], [], 0, 0
    for response, row in zip(responses, rows):
        want, got = row["answer"].split(), response.split()
        exact += got == want
        asked = row["prompt"].removeprefix("Recall: ").split()
        out_of_step += [step[:1] for step in got] != asked
        slipped = False
        for i, step in enumerate(want):
            right = i < len(got) and got[i] == step
            by_position[i].append(right)
            if i:
                (after_slip if slipped else after_none).append(right)
            slipped = slipped or not right

    def share(values: list[bool]) -> float | None:
        return sum(values) / len(values) if values else None

    return {"exact": exact / len(rows), "step_accuracy_by_position": [share(v) for v in by_position],
            "step_accuracy_after_a_slip": share(after_slip), "steps_after_a_slip": len(after_slip),
            "step_accuracy_after_none": share(after_none), "steps_after_none": len(after_none),
            "out_of_step": out_of_step / len(rows)}


def answers(folder: str, rows: list[dict], temperature: float, context: str | None = None, seed: int = 0) -> list[str]:
    """The model in ``folder`` answering ``rows`` as `opcd` samples and evaluates: its chat renderer (``context``,
    if any, as the system message) and its Hugging Face sampler, 24 new tokens at most."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opcd_cli.config import SamplingOptions
    from opcd_cli.prompts import ChatRenderer, with_context
    from opcd_cli.sampling import make_sampler

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    renderer = ChatRenderer(tokenizer, folder)
    prompts = [renderer.prompt_ids(with_context((("user", r["prompt"]),), context, "system")) for r in rows]
    torch.manual_seed(seed)
    responses = make_sampler("hf", tokenizer=tokenizer, model=model).generate(
        prompts, SamplingOptions(temperature=temperature, max_new_tokens=24))
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


TEMPERATURES = (0.0, 1.0)


def run_one(method: str, seed: int, work: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from opcd_cli.config import build_distill_config, read_recipe
    from opcd_cli.distill import distill
    from opcd_cli.toy import world
    from opcd_cli.ui import UI

    folder = Path(work) / f"{method.replace(' ', '_').replace(',', '').replace(':', '')}-{seed}"
    cfg = build_distill_config(read_recipe("toy-recall"), METHODS[method], {
        "seed": seed, "eval_before": seed == 0 and method in ("OPCD", "OPCD, toy:large teacher"),
        "output_dir": str(folder)})
    summary = distill(cfg, UI(quiet=True))
    test = world.splits("recall").test
    steps = {f"T={t:g}": slips(answers(str(folder), test, t, seed=seed), test) for t in TEMPERATURES}
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"method": method, "seed": seed, "before": summary["before"], "after": summary["after"],
            "seconds": summary["seconds"], "steps": steps, "loss": [m["distill_loss"] for m in metrics]}


def base_rows() -> dict:
    """The untrained models step by step, without and with the table in context (the teachers' view)."""
    import torch

    torch.set_num_threads(1)
    from opcd_cli.toy import world

    split = world.splits("recall")
    result = {}
    for size in ("small", "large"):
        folder = str(world.model_path(size))
        for context, view in ((None, "without"), (split.context, "with")):
            result[f"toy:{size} {view} the table"] = {
                f"T={t:g}": slips(answers(folder, split.test, t, context), split.test) for t in TEMPERATURES}
    return result


def run_job(job: dict) -> dict:
    return base_rows() if job["method"] == "base" else run_one(**job)


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def tables(report: dict) -> str:
    runs, lines = report["runs"], []
    lines += ["| row | seeds | no context | with context | context harm | OOD | teacher with context |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    teacher = {r["method"]: r["before"]["teacher_accuracy_with_context"] for r in runs if r["before"]}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        cols = [mean_std([r["after"][key] for r in mine]) for key in ("accuracy", "accuracy_with_context",
                                                                         "context_harm", "ood_accuracy")]
        teacher_row = "OPCD, toy:large teacher" if "toy:large" in method else "OPCD"  # evaluated before training
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cols) + f" | {pct(teacher.get(teacher_row))} |")
    for temperature in (f"T={t:g}" for t in TEMPERATURES):
        lines += ["", f"Step by step, without the context, {temperature} ({'greedy' if temperature == 'T=0' else 'sampled'}; "
                  "% of steps, mean ± std over seeds for trained rows; after a slip: pooled over the seeds, (steps) "
                  "of them):", "",
                  "| row | exact | step 1 | step 2 | step 3 | step 4 | step 5 | after a slip | (steps) | after none | "
                  "out of step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        named = [(name, [row[temperature]]) for name, row in report["base"].items()]
        named += [(method, [r["steps"][temperature] for r in runs if r["method"] == method]) for method in METHODS]
        for name, scored in named:
            if not scored:
                continue
            cols = [mean_std([s["exact"] for s in scored])]
            cols += [mean_std([s["step_accuracy_by_position"][i] for s in scored]) for i in range(5)]
            slipped = sum(s["steps_after_a_slip"] for s in scored)  # few per seed: pooled over the seeds
            right = sum(s["steps_after_a_slip"] * (s["step_accuracy_after_a_slip"] or 0) for s in scored)
            cols += [pct(right / slipped if slipped else None), str(slipped)]
            cols += [mean_std([s[key] for s in scored]) for key in ("step_accuracy_after_none", "out_of_step")]
            lines.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/recall_runs"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--render", type=Path, metavar="JSON", help="write OUT.md from a saved OUT.json; run nothing")
    args = parser.parse_args()
    if args.render:
        markdown = tables(json.loads(args.render.read_text()))
        Path(f"{args.out}.md").write_text(markdown + "\n")
        print(markdown)
        return
    start, runs, base = time.time(), [], {}
    with tempfile.TemporaryDirectory() as work:
        jobs = [{"method": "base"}] + [{"method": m, "seed": s, "work": work} for s in range(args.seeds) for m in METHODS]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for job, result in zip(jobs, pool.imap(run_job, jobs)):
                if job["method"] == "base":
                    base = result
                    continue
                runs.append(result)
                print(f"{time.time() - start:6.0f}s  seed {result['seed']}  {result['method']:30s} no-context "
                      f"{result['after']['accuracy']:.3f}", file=sys.stderr, flush=True)
    report = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, {multiprocessing.cpu_count()} cores",
              "seconds": round(time.time() - start), "seeds": args.seeds, "base": base, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = tables(report)
    Path(f"{args.out}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\n{len(runs)} runs in {report['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
