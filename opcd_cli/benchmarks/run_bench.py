"""``opcd bench run``: a short end-to-end run of the toy world (the built-in recipe of ``--toy-task``, fewer steps),
and the numbers a CI job checks: the loss at the first and the last step, the student's top-k mass at the last,
accuracy after training without and with the context, peak memory, and seconds per step, the last also over
this machine's yardstick (``machine.calibration_ms``) measured in the same process, the ratio the gate reads.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .machine import calibration_ms, machine_info

GATED = {"slower": ["step_over_calibration"], "memory": ["peak_mb"],
         "values": ["loss_first", "loss_last", "topk_mass_last", "accuracy_after", "accuracy_with_context_after"]}


def bench_run(task: str = "codes", steps: int = 10, seed: int = 0) -> dict:
    """The toy run, in a temporary folder that is removed afterwards: one result row."""
    import torch

    from ..config import build_distill_config, read_recipe
    from ..distill import distill
    from ..ui import UI

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    yardstick = calibration_ms(dev)
    with tempfile.TemporaryDirectory(prefix="opcd-bench-run-") as folder:
        cfg = build_distill_config(read_recipe(f"toy-{task}"), {"steps": steps, "seed": seed, "show_prompts": 0,
                                                                "output_dir": str(Path(folder) / "run")})
        summary = distill(cfg, UI(quiet=True))
        metrics = [json.loads(line) for line in (Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()]
    after = summary.get("after") or {}
    step_s = summary["train_seconds"] / steps
    peak = summary.get("peak_memory_gib_by_rank") or [None]
    row = {"name": f"toy-{task}", "shape": f"{steps} steps", "loss_first": metrics[0]["loss"],
           "loss_last": metrics[-1]["loss"], "topk_mass_last": metrics[-1].get("topk_mass"),
           "accuracy_after": after.get("accuracy"), "accuracy_with_context_after": after.get("accuracy_with_context"),
           "step_s": step_s, "calibration_ms": yardstick, "step_over_calibration": step_s * 1e3 / yardstick,
           "peak_mb": peak[0] * 1024 if peak[0] is not None else None,  # the GPU's, or the process's resident peak
           "seconds": summary["seconds"]}
    return {"bench": "run", "task": task, "steps": steps, "seed": seed, "machine": machine_info(dev), "rows": [row],
            "skipped": [], "gated": GATED}
