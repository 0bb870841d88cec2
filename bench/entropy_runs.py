"""Entropy monitoring: does the student collapse under the reverse KL, and what does watching it cost?

    python bench/entropy_runs.py --out bench/entropy_runs.json

1. Runs: `opcd distill` on the toy's two tasks (`codes`, the default, and `shift`), on-policy (the reverse KL
   over the student's top-k) and `--mode off-policy` (the forward KL from the teacher's saved top-k), one seed
   each, in a fresh process as a user types it. Reported from each run's `metrics.jsonl`: the student's mean
   full-vocabulary entropy at the response tokens over the first and the last 5 steps, the teacher's (on-policy),
   and the share of distinct tokens in a step's responses; from its summary the accuracies. The per-step
   curves of all four runs are drawn into `bench/entropy_runs.png`, and the default run's alone into
   `bench/toy_default_metrics.png` (the README's picture), with `opcd plot`.
2. Cost: the PyTorch path's loss and gradients (`topk_kl`, forward and backward, from logits) with and without
   `return_entropy`, at the toy's vocabulary and at 32,000, as a ratio (the Triton kernel keeps the entropy
   in the pass that makes the log-sum-exp; its cost on a GPU is not measured here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_runs import opcd  # noqa: E402

RUNS = (("codes, on-policy", ()), ("codes, off-policy", ("--mode", "off-policy")),
        ("shift, on-policy", ("--toy-task", "shift")), ("shift, off-policy", ("--toy-task", "shift", "--mode", "off-policy")))


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def describe(metrics: list[dict], summary: dict) -> dict:
    first, last = metrics[:5], metrics[-5:]
    pick = lambda rows, key: mean([r.get(key) for r in rows])  # noqa: E731
    return {
        "student_entropy_first5": pick(first, "student_entropy"), "student_entropy_last5": pick(last, "student_entropy"),
        "teacher_entropy_first5": pick(first, "teacher_entropy"), "teacher_entropy_last5": pick(last, "teacher_entropy"),
        "distinct_first5": pick(first, "distinct_tokens"), "distinct_last5": pick(last, "distinct_tokens"),
        "accuracy_before": summary["before"]["accuracy"], "accuracy_after": summary["after"]["accuracy"],
        "ood_before": summary["before"]["ood_accuracy"], "ood_after": summary["after"]["ood_accuracy"],
    }


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def overhead(tokens: int, vocab: int, k: int = 256, repeats: int = 5) -> dict:
    from opcd_cli.kernels import topk_kl

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(tokens, vocab, generator=gen) * 3, torch.randn(tokens, vocab, generator=gen) * 3

    def step(entropy: bool):
        s = student.clone().requires_grad_()
        out = topk_kl(s, teacher, k=min(k, vocab), reduction="sum", return_topk_mass=True, return_entropy=entropy,
                      backend="torch")
        out[0].backward()

    plain, watched = timed(lambda: step(False), repeats), timed(lambda: step(True), repeats)
    return {"tokens": tokens, "vocab": vocab, "plain_s": plain, "with_entropy_s": watched, "ratio": watched / plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/entropy_runs.json"))
    parser.add_argument("--plot", type=Path, default=Path("bench/entropy_runs.png"))
    parser.add_argument("--default-plot", type=Path, default=Path("bench/toy_default_metrics.png"))
    args = parser.parse_args()
    costs = [overhead(512, 512), overhead(512, 32000)]
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for i, (name, extra) in enumerate(RUNS):
            seconds, summary = opcd("distill", *extra, "-o", f"run{i}", cwd=work)
            metrics = [json.loads(line) for line in (work / f"run{i}" / "metrics.jsonl").read_text().splitlines()]
            runs.append({"run": name, "args": list(extra), "wall_s": seconds, **describe(metrics, summary)})
            (work / name.replace(", ", "-")).symlink_to(work / f"run{i}")  # the label opcd plot shows
        opcd("plot", *[name.replace(", ", "-") for name, _ in RUNS], "-o", str(args.plot.resolve()), "--overwrite",
             cwd=work)
        opcd("plot", "run0", "-o", str(args.default_plot.resolve()), "--overwrite", cwd=work)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, "
                   f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "runs": runs, "overhead": costs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print("| run | student entropy, first 5 steps | last 5 | teacher entropy first 5 | last 5 | distinct tokens "
          "first 5 | last 5 | no-context accuracy before | after | OOD before | after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['run']} | {fmt(r['student_entropy_first5'])} | {fmt(r['student_entropy_last5'])} | "
              f"{fmt(r['teacher_entropy_first5'])} | {fmt(r['teacher_entropy_last5'])} | {fmt(r['distinct_first5'])} | "
              f"{fmt(r['distinct_last5'])} | {r['accuracy_before']:.1%} | {r['accuracy_after']:.1%} | "
              f"{r['ood_before']:.1%} | {r['ood_after']:.1%} |")
    print("\n| tokens | vocabulary | loss + gradients, s | with the entropies, s | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for c in costs:
        print(f"| {c['tokens']} | {c['vocab']} | {c['plain_s']:.4f} | {c['with_entropy_s']:.4f} | {c['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
