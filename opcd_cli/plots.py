"""Plots of runs' per-step metrics: ``metrics.png`` beside every run's ``metrics.jsonl``, and ``opcd plot``.

One panel per metric (loss, top-k mass, mean response tokens, learning rate, gradient norm, the student's and
the teacher's entropy at the response tokens, the share of distinct tokens in the step's responses), in two
rows, the step on the x axis, one line per run; a metric no run has leaves its panel empty. matplotlib draws off-screen (the Agg backend); the file is written under a
temporary name and renamed.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import OpcdError, first_line
from .outputs import replaced_file

METRICS = (("loss", "loss"), ("topk_mass", "top-k mass"), ("response_tokens", "mean response tokens"),
           ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("student_entropy", "student entropy (nats)"),
           ("teacher_entropy", "teacher entropy (nats)"), ("distinct_tokens", "distinct tokens / tokens"))
COLUMNS = 4
METRICS_FILE = "metrics.jsonl"


def read_metrics(run: Path) -> list[dict]:
    """The per-step rows of a run folder (or of a ``metrics.jsonl`` given directly)."""
    path = run / METRICS_FILE if run.is_dir() else run
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise OpcdError(f"{run} has no readable {METRICS_FILE} ({e.strerror or e}); give an opcd run folder") from None
    except UnicodeDecodeError as e:
        raise OpcdError(f"{path} is not UTF-8 text (byte {e.start}); give an opcd run's {METRICS_FILE}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise OpcdError(f"{path}:{number}: not a JSON line ({first_line(e)})") from None
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                raise OpcdError(f"{path}:{number}: not a step's metrics (a JSON object with a whole-number `step`); "
                                f"give an opcd run's {METRICS_FILE}")
            rows.append(row)
    return rows


def plot_runs(runs: list[tuple[str, list[dict]]], out: Path, title: str | None = None) -> Path:
    """Draw ``runs`` ((label, metric rows) pairs) into the PNG ``out``; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(METRICS) // COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(4 * COLUMNS, 3.2 * rows), constrained_layout=True, squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(METRICS):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes, METRICS):
        for i, (name, rows) in enumerate(runs):  # a run keeps its colour in every panel, even one it lacks
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=name, linewidth=1.5, color=f"C{i % 10}")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    try:
        with replaced_file(out) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out
