"""How much the gated ratios of ``opcd bench loss --preset cpu-smoke`` move from run to run on this machine: the
evidence for the gate's default ``--max-slowdown``.

    python bench/gate_spread.py --runs 5 --out bench/gate_spread_cpu.json

Runs the command ``--runs`` times, one after another, and reports per provider and shape each run's time over
the matmul floor (the gated ratio), its peak memory and loss, and the largest ratio between two runs (max / min):
a default limit
must sit above it, and below 1.5 (a deliberate 1.5x slowdown must fail the gate).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "opcd_cli", "bench", "loss", "--preset", "cpu-smoke", "--json"],
                              capture_output=True, text=True, check=True)
        runs.append({"seconds": time.perf_counter() - start, "result": json.loads(done.stdout)})
        print(f"run {i + 1}: {runs[-1]['seconds']:.1f} s", flush=True)
    rows = {}
    for run in runs:
        for row in run["result"]["rows"]:
            entry = rows.setdefault(f"{row['name']} at {row['shape']}", {"time_over_floor": [], "peak_mb": [], "loss": []})
            for key in entry:
                entry[key].append(row.get(key))
    table = []
    for key, entry in rows.items():
        ratios = entry["time_over_floor"]
        table.append({"row": key, "time_over_floor": [round(r, 3) for r in ratios],
                      "max_over_min": round(max(ratios) / min(ratios), 3), "peak_mb": entry["peak_mb"],
                      "loss": entry["loss"]})
        print(f"{key:45s} x floor {' '.join(f'{r:.2f}' for r in ratios)}  max/min {table[-1]['max_over_min']:.3f}  "
              f"peak MiB {entry['peak_mb']}")
    worst = max(t["max_over_min"] for t in table if not t["row"].startswith("matmul_floor"))
    print(f"largest max/min of a gated ratio: {worst:.3f}; run times {[round(r['seconds'], 1) for r in runs]} s")
    result = {"date": datetime.date.today().isoformat(), "machine": runs[0]["result"]["machine"],
              "command": "opcd bench loss --preset cpu-smoke --json", "runs": args.runs,
              "seconds": [round(r["seconds"], 1) for r in runs], "rows": table, "largest_max_over_min": worst}
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
