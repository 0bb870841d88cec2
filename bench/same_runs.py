"""Whether a change kept behaviour: the same ``opcd distill`` commands run with the code of an earlier commit
and with this checkout, every number of ``summary.json`` and ``metrics.jsonl`` that does not measure time
compared.

    python bench/same_runs.py --before 61b97da

The earlier code runs from a temporary git worktree, through this venv (``PYTHONPATH``). Prints one line per
command: identical, or each number that differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "default": [],
    "off-policy": ["--mode", "off-policy", "--steps", "4"],
    "separate-teacher-off-policy": ["--teacher", "toy:large", "--mode", "off-policy", "--steps", "3"],
    "lora": ["--recipe", "toy-codes-lora", "--steps", "3"],
    "game": ["--toy-task", "game", "--steps", "2", "--eval-games", "4"],
    "packed-regulariser": ["--steps", "3", "--micro-batch-tokens", "512", "--consistency-weight", "0.1"],
}
TIMES = {"tokens_per_s", "step_seconds", "seconds_by_phase", "seconds", "train_seconds", "time_by_phase",
         "peak_memory_gib_by_rank", "output_dir", "inputs"}


def run(tree: Path, out: Path, args: list[str]) -> tuple[dict, list[dict]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, "-m", "opcd_cli.cli", "distill", *args, "--show-prompts", "0", "--json",
                           "-o", str(out)], capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode:
        sys.exit(f"{tree}: opcd distill {' '.join(args)} failed: {done.stderr[-2000:]}")
    strip = lambda d: {k: v for k, v in d.items() if k not in TIMES}  # noqa: E731
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return strip(json.loads(done.stdout)), [strip(m) for m in metrics]


def differences(old: tuple[dict, list[dict]], new: tuple[dict, list[dict]]) -> list[str]:
    found = [f"summary {k}: {old[0].get(k)} -> {new[0].get(k)}" for k in sorted(set(old[0]) | set(new[0]))
             if old[0].get(k) != new[0].get(k)]
    if len(old[1]) != len(new[1]):
        found.append(f"steps: {len(old[1])} -> {len(new[1])}")
    for a, b in zip(old[1], new[1]):
        found += [f"step {a['step']} {k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="same-runs-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(work / "before"), args.before], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        for name, extra in COMMANDS.items():
            old, new = run(work / "before", work / "old" / name, extra), run(ROOT, work / "new" / name, extra)
            found = differences(old, new)
            last = new[1][-1]
            print(f"{name}: {'identical' if not found else 'DIFFERENT'} ({len(new[1])} steps, final loss "
                  f"{last['loss']:.6f}, after {json.dumps(new[0]['after'])[:120]})", flush=True)
            for line in found:
                print("  " + line)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(work / "before")], cwd=ROOT, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
