"""Baselines and the gate: ``--save-baseline FILE`` keeps a benchmark's numbers with the machine and versions
they came from; ``--baseline FILE`` compares a new run with them, number by number, and names every regression
in one line (which row, which number, by how much). The gate reads ratios, never absolute times: a time is
compared as the ratio the benchmark measured in its own run (over the matmul floor, over this machine's
yardstick), so a baseline made on one machine holds on another of the same device kind. A baseline from
another device kind is refused.

Each benchmark's result says which of its numbers are gated (``GATED`` keys in ``result["gated"]``):
``slower`` ratios (a regression when the new one exceeds the old by more than ``max_slowdown``), ``memory``
(by more than ``max_memory_growth``, and more than ``MEMORY_SLACK_MB``: small peaks move by a page or two),
``values`` (losses, accuracies: a regression when they move by more than ``tolerance``, relative) and
``correct`` (a check that passed and now fails).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import OpcdError

MEMORY_SLACK_MB = 4.0


@dataclass(frozen=True)
class Limits:
    max_slowdown: float = 1.3  # above the spread of five runs on a 2-core CPU (bench/RESULTS.md)
    max_memory_growth: float = 1.2
    tolerance: float = 1e-3  # relative, for losses and other values

    def __post_init__(self):
        for name in ("max_slowdown", "max_memory_growth"):
            value = getattr(self, name)
            if not value >= 1:
                raise OpcdError(f"--{name.replace('_', '-')} must be at least 1 (1.3: 30% slower is a regression); "
                                f"got {value}")
        if not self.tolerance >= 0:
            raise OpcdError(f"--tolerance must be at least 0; got {self.tolerance}")


def row_key(row: dict) -> str:
    return f"{row['name']} at {row['shape']}" if row.get("shape") else row["name"]


def save(result: dict, path: str) -> None:
    """The result as a baseline file, written whole or not at all."""
    target = Path(path)
    if target.is_dir():
        raise OpcdError(f"--save-baseline {path} is a folder; give a file name such as bench/baselines/cpu.json")
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as e:
        raise OpcdError(f"cannot write --save-baseline {path}: {e.strerror or e}") from None


def load(path: str) -> dict:
    try:
        baseline = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OpcdError(f"--baseline {path} does not exist; make one with --save-baseline") from None
    except (OSError, ValueError) as e:
        raise OpcdError(f"--baseline {path} is not a baseline file ({type(e).__name__})") from None
    if not isinstance(baseline, dict) or not {"bench", "machine", "rows", "gated"} <= baseline.keys():
        raise OpcdError(f"--baseline {path} is not a baseline file made by opcd bench --save-baseline")
    return baseline


def check_comparable(baseline: dict, bench: str, here: str, path: str = "the baseline") -> None:
    """A baseline of another benchmark, or from another device kind, is refused in one line."""
    if baseline["bench"] != bench:
        raise OpcdError(f"--baseline {path} was made by opcd bench {baseline['bench']}, not opcd bench {bench}")
    kind = baseline["machine"].get("device_kind")
    if kind != here:
        raise OpcdError(f"--baseline {path} was made on {kind}, this machine is {here}: compare against a baseline "
                        "made on the same kind of device (make one here with --save-baseline)")


def compare(baseline: dict, result: dict, limits: Limits, path: str = "the baseline") -> list[str]:
    """One line per regression of ``result`` against ``baseline`` (none: the gate holds)."""
    check_comparable(baseline, result["bench"], result["machine"]["device_kind"], path)
    now = {row_key(r): r for r in result["rows"]}
    gated = baseline["gated"]
    lines = []
    for old in baseline["rows"]:
        key = row_key(old)
        new = now.get(key)
        if new is None:
            why = next((s["why"] for s in result.get("skipped", []) if s.get("name") == old["name"]), "not run")
            lines.append(f"{key}: in the baseline, not measured now ({why})")
            continue
        lines += _slower(key, old, new, gated.get("slower", []), limits)
        lines += _memory(key, old, new, gated.get("memory", []), limits)
        lines += _values(key, old, new, gated.get("values", []), limits)
        lines += [f"{key}: {name} passed in the baseline and fails now" for name in gated.get("correct", [])
                  if old.get(name) and not new.get(name)]
    return lines


def _slower(key, old, new, names, limits) -> list[str]:
    lines = []
    for name in names:
        if old.get(name) and new.get(name) is not None and new[name] > old[name] * limits.max_slowdown:
            lines.append(f"{key}: {name} {new[name]:.3g}, was {old[name]:.3g} ({new[name] / old[name]:.2f}x slower; "
                         f"the limit is {limits.max_slowdown:.2f}x)")
    return lines


def _memory(key, old, new, names, limits) -> list[str]:
    lines = []
    for name in names:
        if old.get(name) is None or new.get(name) is None:
            continue
        if new[name] > old[name] * limits.max_memory_growth and new[name] - old[name] > MEMORY_SLACK_MB:
            lines.append(f"{key}: {name} {new[name]:.1f} MiB, was {old[name]:.1f} MiB "
                         f"({new[name] / max(old[name], 1e-9):.2f}x; the limit is {limits.max_memory_growth:.2f}x)")
    return lines


def _values(key, old, new, names, limits) -> list[str]:
    lines = []
    for name in names:
        if old.get(name) is None or new.get(name) is None:
            continue
        drift = abs(new[name] - old[name]) / max(abs(old[name]), 1e-12)
        if drift > limits.tolerance:
            lines.append(f"{key}: {name} {new[name]:.6g}, was {old[name]:.6g} (moved by {drift:.2e}, relative; "
                         f"the tolerance is {limits.tolerance:.0e})")
    return lines
