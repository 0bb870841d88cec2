"""Wall time and accuracies of the toy world's runs, each in a fresh process as a user types it.

    python bench/toy_runs.py --out bench/toy_runs.json

Runs, one after another, in a temporary folder: `opcd distill` with no arguments (the default, `codes`
task) `--repeats` times; `opcd distill --toy-task shift`; the LoRA student (`--recipe toy-codes-lora`); and
the experiential pipeline of the README,
`opcd extract` then `opcd distill --toy-task codes --context exp.txt`. Each is timed from the shell's side
(process start to exit, imports included). Prints a Markdown table and writes every `--json` summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = (("before", "accuracy"), ("after", "accuracy"), ("before", "teacher_accuracy_with_context"),
        ("after", "accuracy_with_context"), ("after", "context_harm"), ("before", "ood_accuracy"),
        ("after", "ood_accuracy"))


def opcd(*args: str, cwd: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "opcd_cli", *args, "--json"], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"opcd {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return seconds, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/toy_runs.json"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for i in range(args.repeats):
            seconds, summary = opcd("distill", "-o", f"default-{i}", cwd=work)
            runs.append({"run": f"opcd distill (default, run {i + 1})", "wall_s": seconds, "summary": summary})
        seconds, summary = opcd("distill", "--toy-task", "shift", "-o", "shift", cwd=work)
        runs.append({"run": "opcd distill --toy-task shift", "wall_s": seconds, "summary": summary})
        seconds, summary = opcd("distill", "--recipe", "toy-codes-lora", "-o", "lora", cwd=work)
        runs.append({"run": "opcd distill --recipe toy-codes-lora", "wall_s": seconds, "summary": summary})
        seconds, summary = opcd("extract", "-o", "exp.txt", cwd=work)
        runs.append({"run": "opcd extract", "wall_s": seconds, "summary": summary})
        seconds, summary = opcd("distill", "--toy-task", "codes", "--context", "exp.txt", "-o", "pipeline", cwd=work)
        runs.append({"run": "opcd distill --toy-task codes --context exp.txt", "wall_s": seconds, "summary": summary})

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, Python {platform.python_version()}",
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    def pct(values: dict, key: str) -> str:
        return f"{100 * values[key]:.1f}%" if isinstance(values.get(key), (int, float)) else "-"

    print("| run | wall s | " + " | ".join(f"{key} {when}" for when, key in KEYS) + " |")
    print("|---|---:|" + "---:|" * len(KEYS))
    for r in runs:
        s = r["summary"]
        if "val_accuracy_best" not in s:
            print(f"| `{r['run']}` | {r['wall_s']:.1f} | " + " | ".join(pct(s[when] or {}, k) for when, k in KEYS) + " |")
    for r in runs:
        s = r["summary"]
        if "val_accuracy_best" in s:
            print(f"\n`{r['run']}`: {r['wall_s']:.1f} s; validation accuracy {pct(s, 'val_accuracy_without')} without "
                  f"experience, {pct(s, 'val_accuracy_best')} with the best round's ({s['items']} items, round "
                  f"{s['best_round']})")

if __name__ == "__main__":
    main()
