"""Peak memory of a LoRA student (teacher = the same model with its adapters off) against a full-weight student
with a frozen teacher copy, each in a fresh process.

    python bench/bench_lora_memory.py --out bench/lora_memory.json

For each model (the toy student, and a random model of Qwen3-0.6B's shape around the toy tokenizer: 28
layers, hidden 1024, 151,936 output rows, tied embeddings), runs `opcd distill` twice with the same prompts and
settings, `--steps 2` (two AdamW steps: the optimiser state exists at the peak), once full and once with
`--lora-rank 16`, and records the peak resident memory of the process (``ru_maxrss``), the trainable
parameters and the wall time. Prints a Markdown table with the ratio LoRA / full.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN3_0_6B = dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab_rows=151936)


def make_qwen3_shaped(folder: Path) -> Path:
    """A random-weight model with Qwen3-0.6B's architecture and sizes, saved with the toy tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opcd_cli.toy.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    s = QWEN3_0_6B
    config = Qwen3Config(vocab_size=s["vocab_rows"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                         intermediate_size=s["intermediate"], max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def child(args: list[str]) -> None:
    """Run ``opcd distill ARGS --json`` in this process; print its summary with this process's peak RSS."""
    from opcd_cli.cli import main as opcd_main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = opcd_main(["distill", *args, "--json"])
    if code != 0:
        sys.exit(code)
    summary = json.loads(out.getvalue())  # with --json, stdout holds the summary alone
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_gib": peak_kib / 2**20, "trainable_parameters": summary["trainable_parameters"]}))


def measure(args: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", "--", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"opcd distill {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    if "--child" in sys.argv:
        child(sys.argv[sys.argv.index("--") + 1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/lora_memory.json"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--models", default="toy,qwen3-0.6b-shape")
    opts = parser.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in opts.models.split(","):
            student = "toy:small" if name == "toy" else str(make_qwen3_shaped(tmp / name))
            common = ["--student", student, "--data", "toy:codes/train", "--context", "toy:codes/context",
                      "--steps", "2", "--batch-size", "4", "--max-new-tokens", "8", "--topk", "16", "--lr", "1e-4",
                      "--no-eval-before"]
            full = measure([*common, "-o", str(tmp / f"{name}-full")])
            lora = measure([*common, "--lora-rank", str(opts.rank), "-o", str(tmp / f"{name}-lora")])
            params = sum(t.numel() for t in _weights(tmp / f"{name}-full").values())
            rows.append({"model": name, "parameters": params, "full": full, "lora": lora,
                         "lora_over_full": round(lora["peak_rss_gib"] / full["peak_rss_gib"], 3)})
            print(f"{name}: full {full['peak_rss_gib']:.2f} GiB, LoRA {lora['peak_rss_gib']:.2f} GiB", flush=True)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {_cpus()} CPUs",
              "torch": torch.__version__, "rank": opts.rank, "rows": rows}
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| model | parameters | full: peak RSS | LoRA: peak RSS | LoRA / full | LoRA trainable | full s | LoRA s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['full']['peak_rss_gib']:.2f} GiB | "
              f"{r['lora']['peak_rss_gib']:.2f} GiB | {r['lora_over_full']:.2f} | "
              f"{r['lora']['trainable_parameters'] / 1e6:.2f}M | {r['full']['seconds']} | {r['lora']['seconds']} |")


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
