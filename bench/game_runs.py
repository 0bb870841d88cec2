"""The toy world's game, distilled on-policy and off-policy, and from experience the model extracted itself.

    python bench/game_runs.py --out bench/game_runs.json

Runs, one after another, in a temporary folder and each in a fresh process as a user types it:
`opcd distill --toy-task game` (on-policy, the default); the same with `--mode off-policy` (the teacher plays
the games with the items, the student learns its replies); and the experiential pipeline on games:
`opcd extract --recipe toy-game-extract` then `opcd distill --toy-task game --context exp.txt`. Prints a
Markdown table of games won (64 seeded greedy games) and writes every `--json` summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

from toy_runs import opcd  # one opcd --json process, timed from the shell's side (bench/ is on the path)

KEYS = (("before", "success"), ("after", "success"), ("before", "teacher_success_with_context"),
        ("after", "success_with_context"), ("after", "context_harm"), ("before", "ood_success"),
        ("after", "ood_success"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/game_runs.json"))
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for name, extra in (("on-policy", []), ("off-policy", ["--mode", "off-policy"])):
            seconds, summary = opcd("distill", "--toy-task", "game", *extra, "-o", name, cwd=work)
            runs.append({"run": f"opcd distill --toy-task game {' '.join(extra)}".strip(), "wall_s": seconds,
                         "summary": summary})
        seconds, summary = opcd("extract", "--recipe", "toy-game-extract", "-o", "exp.txt", cwd=work)
        runs.append({"run": "opcd extract --recipe toy-game-extract", "wall_s": seconds, "summary": summary})
        items = (work / "exp.txt").read_text()
        seconds, summary = opcd("distill", "--toy-task", "game", "--context", "exp.txt", "-o", "pipeline", cwd=work)
        runs.append({"run": "opcd distill --toy-task game --context exp.txt", "wall_s": seconds, "summary": summary,
                     "experience": items})

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, Python {platform.python_version()}",
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['date']}, {report['machine']}\n")
    print("| run | wall (s) | " + " | ".join(f"{when} {key}" for when, key in KEYS) + " |")
    print("|---|---:|" + "---:|" * len(KEYS))
    for run in runs:
        summary = run["summary"]
        cells = []
        for when, key in KEYS:
            value = (summary.get(when) or {}).get(key)
            cells.append("" if value is None else f"{100 * value:.1f}%")
        if "rounds" in summary:  # the extraction: games won on its validation seeds, without and with the items
            cells = [f"{100 * summary['val_accuracy_without']:.1f}% (val)", f"{100 * summary['val_accuracy_best']:.1f}% "
                     f"(val, {summary['items']} items)"] + [""] * (len(KEYS) - 2)
        print(f"| {run['run']} | {run['wall_s']:.0f} | " + " | ".join(cells) + " |")
    on, off = runs[0]["summary"]["after"]["success"], runs[1]["summary"]["after"]["success"]
    print(f"\ngames won without the items after training: on-policy {100 * on:.1f}%, off-policy {100 * off:.1f}%"
          + (f" ({on / off:.2f}x)" if off else ""))


if __name__ == "__main__":
    main()
