"""How long the test suite takes: the full suite and the quick tier, each run several times, with the slowest
tests and files of the last run.

    python bench/suite_times.py --runs 3 --out bench/suite_times.json            # in a checkout with its venv active
    python bench/suite_times.py --runs 1 --pytest-args=-n0 --out serial.json     # one process, as before pytest-xdist

Each run is ``pytest -q -p no:cacheprovider`` (and ``-m "not slow"`` for the quick tier) from the repository
root with a JUnit report, timed from outside. The JSON holds every run's seconds and test counts, and of the
last full run the 30 slowest tests and the time by file (seconds summed over a file's tests; with several
pytest processes the sum exceeds the run's time). Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIERS = {"full": [], "quick": ["-m", "not slow"]}


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    import os

    return f"{os.cpu_count()}-core {model}, Python {platform.python_version()}"


def run(tier: str, extra: list[str], report: Path) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TIERS[tier], *extra,
               f"--junitxml={report}"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cases = list(ElementTree.parse(report).iter("testcase"))
    failed = [{"test": c.get("name"), "message": (c.find("failure") if c.find("failure") is not None
                                                  else c.find("error")).get("message", "")[-3000:]}
              for c in cases if c.find("failure") is not None or c.find("error") is not None]
    return {"tier": tier, "command": shlex.join(command[1:-1]), "seconds": round(seconds, 1),
            "returncode": proc.returncode, "tests": len(cases), "failed": failed,
            "last_line": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""}


def slowest(report: Path, n: int = 30) -> tuple[list, list]:
    """The ``n`` slowest tests, and every file's summed seconds, of a JUnit report."""
    tests, by_file = [], collections.Counter()
    for case in ElementTree.parse(report).iter("testcase"):
        seconds = float(case.get("time") or 0)
        path = case.get("classname").replace(".", "/") + ".py"
        tests.append((round(seconds, 2), f"{path}::{case.get('name')}"))
        by_file[path] += seconds
    tests.sort(reverse=True)
    return tests[:n], [(round(s, 1), path) for path, s in by_file.most_common()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiers", default="full,quick", help="comma-separated: full, quick")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments, e.g. -n0")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    extra = shlex.split(args.pytest_args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "commit": commit, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for tier in args.tiers.split(","):
            for i in range(args.runs):
                report = Path(tmp) / f"{tier}-{i}.xml"
                result["runs"].append(run(tier, extra, report))
                print(json.dumps(result["runs"][-1]), file=sys.stderr)
                if tier == "full" and i == args.runs - 1:
                    result["slowest_tests"], result["seconds_by_file"] = slowest(report)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(r["returncode"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
