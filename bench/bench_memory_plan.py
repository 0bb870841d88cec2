"""The memory plan of ``opcd distill --dry-run`` against the measured peak of a training step on this CPU, and
what ``--gradient-checkpointing`` saves.

    python bench/bench_memory_plan.py --out bench/memory_plan_cpu.json

For each model (the toy student; a random model with Qwen3-0.6B's layer shapes and vocabulary but 4 decoder
layers, so that a step runs in about a minute here; and 8 of those layers over the toy's 128-token vocabulary,
where the activations dominate) and each setting of gradient checkpointing, a fresh process loads
the student in float32 and its frozen copy as the teacher (as ``opcd distill`` does by default), then runs two
training steps (teacher forward, student forward and backward through the fused top-k loss, AdamW's step) on
one sequence of ``--tokens`` tokens; the second is the steady state, with AdamW's moments held throughout
(the first step creates them only after its backward), and its time is reported. A thread samples the
process's resident memory every 2 ms; the measured figure is the peak during loading and the steps, minus the
resident memory before anything was loaded (Python, torch, transformers). The plan is ``opcd_cli.memory.estimate`` for the same shapes and tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QWEN3_06B_4_LAYERS = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
                          num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                          max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
# Qwen3-0.6B's layers, 8 of them, over the toy's 128-token vocabulary: the activations dominate
QWEN3_06B_LAYERS_8_SMALL_VOCAB = {**QWEN3_06B_4_LAYERS, "num_hidden_layers": 8, "vocab_size": 128}


def machine() -> str:
    """The CPU's model name and count, for the record."""
    name = platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPUs, no GPU"


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    def __init__(self):
        self.peak, self._stop = resident_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def child(folder: str, tokens: int, checkpointing: bool) -> dict:
    """One step in this process; returns the measured bytes and seconds."""
    import torch

    from opcd_cli import models
    from opcd_cli.loss import DistillLoss
    from opcd_cli.micro_batches import pack

    torch.manual_seed(0)
    before = resident_bytes()
    with PeakSampler() as peak:
        student = models.load_model(folder, "float32")
        teacher = models.frozen(models.frozen_copy(student))
        if checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train()
        vocab = models.output_rows(student)
        loss = DistillLoss(student, teacher, vocab, min(256, vocab), False, 0.0, "torch")
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
        prompt_len = 64
        ids = torch.randint(0, vocab, (tokens,)).tolist()
        prompt, response = ids[:prompt_len], ids[prompt_len:]
        context = torch.randint(0, vocab, (32,)).tolist() + prompt
        for _ in range(2):  # the second step is the steady state: AdamW's moments exist through it
            start = time.perf_counter()
            parts = loss.on_policy(pack([prompt], [response], 0, "cpu"), pack([context], [response], 0, "cpu"))
            (parts.total / len(response)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
    return {"measured_bytes": peak.peak - before, "step_seconds": seconds}


def planned(folder: str, tokens: int, checkpointing: bool) -> dict:
    import torch

    from opcd_cli.memory import estimate, model_shape

    shape = model_shape(folder)
    rows, per_1k = estimate(shape, None, world=1, compute=torch.float32, lora=False, teacher_sharding="replicate",
                            checkpointing=checkpointing)
    return {"planned_bytes": sum(rows.values()) + per_1k * (tokens + 32) / 1000, "fixed_bytes": sum(rows.values()),
            "activation_bytes": per_1k * (tokens + 32) / 1000, "parameters": shape.parameters}


def make_qwen3_shaped(folder: Path, shape: dict = QWEN3_06B_4_LAYERS) -> str:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opcd_cli.toy.tokenizer import build_tokenizer

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**shape)).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)  # the plan reads no tokenizer; loading wants one
    return str(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/memory_plan_cpu.json")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt + response tokens of the step's sequence")
    parser.add_argument("--replan", action="store_true",
                        help="keep the measurements in --out and compute the plan column again (after the plan changed)")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "TOKENS", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        folder, tokens, checkpointing = args.child
        print(json.dumps(child(folder, int(tokens), checkpointing == "1")))
        return 0
    from opcd_cli import sources

    results = []
    measured = {}
    if args.replan:
        record = json.loads(Path(args.out).read_text())
        measured = {(r["model"], r["gradient_checkpointing"]): r for r in record["results"]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in (("toy:small", sources.model_folder("toy:small")),
                             ("Qwen3-0.6B-shaped, 4 layers", make_qwen3_shaped(Path(tmp) / "qwen3")),
                             ("Qwen3-0.6B layers x8, 128-token vocabulary",
                              make_qwen3_shaped(Path(tmp) / "qwen3-8", QWEN3_06B_LAYERS_8_SMALL_VOCAB))):
            for checkpointing in (False, True):
                if args.replan:
                    old = measured[(name, checkpointing)]
                    step = {"measured_bytes": old["measured_bytes"], "step_seconds": old["step_seconds"]}
                else:
                    out = subprocess.run([sys.executable, __file__, "--child", folder, str(args.tokens),
                                          "1" if checkpointing else "0"], capture_output=True, text=True, check=True,
                                         env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
                    step = json.loads(out.stdout.strip().splitlines()[-1])
                row = {"model": name, "gradient_checkpointing": checkpointing, "tokens": args.tokens, **step,
                       **planned(folder, args.tokens, checkpointing)}
                row["plan_error"] = row["planned_bytes"] / row["measured_bytes"] - 1
                results.append(row)
                print(f"{name:30s} checkpointing {'on ' if checkpointing else 'off'}: measured "
                      f"{row['measured_bytes'] / 2**20:8.1f} MiB, planned {row['planned_bytes'] / 2**20:8.1f} MiB "
                      f"({100 * row['plan_error']:+.0f}%), step {row['step_seconds']:.2f} s", flush=True)
    for name in {r["model"] for r in results}:
        off, on = (next(r for r in results if r["model"] == name and r["gradient_checkpointing"] is c)
                   for c in (False, True))
        print(f"{name}: checkpointing peak {on['measured_bytes'] / off['measured_bytes']:.2f}x, "
              f"step time {on['step_seconds'] / off['step_seconds']:.2f}x")
    if args.replan:  # the measurements keep their own date and machine
        record.update(results=results, replanned=datetime.date.today().isoformat())
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        return 0
    record = {"date": datetime.date.today().isoformat(), "machine": machine(), "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
