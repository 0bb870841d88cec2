"""Scaling out on this machine: the same run as 1 and 2 processes (torchrun, gloo, FSDP2), its numbers, its step
time and its memory per rank, against the plan of ``opcd distill --dry-run``.

    python bench/bench_scaling.py --out bench/scaling_cpu.json

Two students, each trained for a few steps with greedy rollouts (so every world size trains on the same
tokens) and the default teacher (a frozen copy of the student):

* the toy student (``toy:small``);
* a random model with Qwen3-0.6B's layer shapes and vocabulary but 4 decoder layers (215M parameters), where
  the float32 master weights, gradients and AdamW state dominate: at 2 processes each rank holds half of
  them, plus what FSDP2 gathers (the root group with the 151,936-row embedding, and a layer at a time).
  It also runs with ``--teacher-sharding shard``.

Reported per run: the final loss (equal across world sizes within float32 rounding), seconds of training,
and each rank's peak resident memory (``peak_memory_gib_by_rank`` of the summary) beside the plan's
estimate for that world size. On a CPU the ranks share the same two cores, so step time cannot fall here;
the GPU figure for one device is ``bench/bench_train_step.py``'s (``bench/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory_plan import machine, make_qwen3_shaped  # noqa: E402


def run(folder: Path, name: str, world: int, args: list[str]) -> dict:
    command = [sys.executable, "-m", "opcd_cli", "distill"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), "-m",
        "opcd_cli", "distill"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
    out = subprocess.run([*command, "-o", str(folder / name), "--overwrite", "--json", *args], capture_output=True,
                         text=True, env=env, cwd=folder)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout)
    metrics = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
    return {"run": name, "world_size": world, "losses": [m["loss"] for m in metrics],
            "train_seconds": summary["train_seconds"], "peak_memory_gib_by_rank": summary["peak_memory_gib_by_rank"]}


def plan(folder: Path, world: int, args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "opcd_cli", "distill", "--dry-run", "--json", "--world-size", str(world),
                          *args], capture_output=True, text=True, check=True, cwd=folder)
    return json.loads(out.stdout)


QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6)


def paper_plans(folder: Path) -> list[dict]:
    """The dry-run plan per GPU of recipes/qwen3-8b-experience-8gpu.toml (a config folder of Qwen3-8B's shape,
    no weights), at 8 and 16 GPUs, and what each memory flag changes."""
    from transformers import Qwen3Config

    from opcd_cli.toy.tokenizer import build_tokenizer

    model = folder / "qwen3-8b-config"
    Qwen3Config(**QWEN3_8B).save_pretrained(model)
    build_tokenizer().save_pretrained(model)  # the plan renders the prompts; the toy's are short
    recipe = Path(__file__).parent.parent / "recipes" / "qwen3-8b-experience-8gpu.toml"
    base = ["--recipe", str(recipe), "--student", str(model), "--data", "train.jsonl", "--context", "toy:codes/context",
            "--dtype", "bfloat16"]
    variants = {"recipe": [], "micro-batches of 4 responses": ["--batch-size", "4", "--grad-accum", "32"],
                "no gradient checkpointing": ["--no-gradient-checkpointing"],
                "teacher replicated": ["--teacher-sharding", "replicate"], "LoRA rank 64": ["--lora-rank", "64"]}
    rows = []
    for world in (8, 16):
        for name, flags in variants.items():
            estimate = plan(folder, world, [*base, *flags])
            rows.append({"world_size": world, "variant": name, **estimate})
            print(f"Qwen3-8B plan, {world:2d} GPUs, {name:26s}: fixed {estimate['fixed_gib']:6.1f} GiB, activations "
                  f"{estimate['activations_gib_per_1k_tokens']:.3f} GiB per 1k tokens, "
                  f"{estimate['total_gib_at_longest_micro_batch']:6.1f} GiB at "
                  f"{estimate['micro_batch_tokens_at_most']:,} tokens, plus vLLM's {estimate['vllm_share']:.0%} of the GPU",
                  flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/scaling_cpu.json")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--students", default="toy,qwen3-shaped", help="which students to run, comma-separated")
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    rows = []
    common = ["--steps", str(args.steps), "--temperature", "0", "--batch-size", "4", "--grad-accum", "2",
              "--kernel", "torch", "--show-prompts", "0", "--no-eval-before"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from opcd_cli import sources

        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sources.rows("toy:codes/train")[:64]))
        (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sources.rows("toy:codes/test")[:16]))
        qwen = make_qwen3_shaped(folder / "qwen3-shaped")
        students = {
            "toy": ["--eval-data", "test.jsonl", "--ood-data", "test.jsonl"],
            "qwen3-shaped": ["--student", qwen, "--data", "train.jsonl", "--context", "toy:codes/context",
                             "--max-new-tokens", "32", "--topk", "256", "--lr", "1e-6"],
        }
        students = {name: flags for name, flags in students.items() if name in args.students.split(",")}
        for student, extra in students.items():
            settings = [([], "replicate")] + ([(["--teacher-sharding", "shard"], "shard")] if student != "toy" else [])
            for flags, sharding in settings:
                for world in (1, 2):
                    if world == 1 and sharding == "shard":
                        continue
                    row = run(folder, f"{student}-{world}-{sharding}", world, [*common, *extra, *flags])
                    estimate = plan(folder, world, [*common, *extra, *flags])
                    row.update(student=student, teacher_sharding=sharding,
                               plan_gib=estimate["total_gib_at_longest_micro_batch"],
                               parameters=estimate["student_parameters"])
                    rows.append(row)
                    print(f"{student:13s} world {world} teacher {sharding:9s}: final loss {row['losses'][-1]:.6f}, "
                          f"train {row['train_seconds']:.1f} s, peak memory by rank "
                          f"{', '.join(f'{g:.2f}' for g in row['peak_memory_gib_by_rank'])} GiB "
                          f"(plan {estimate['total_gib_at_longest_micro_batch']:.2f} GiB beside the process)",
                          flush=True)
        plans = paper_plans(folder)
    for student in students:
        one = next(r for r in rows if r["student"] == student and r["world_size"] == 1)
        two = next(r for r in rows if r["student"] == student and r["world_size"] == 2 and r["teacher_sharding"] == "replicate")
        worst = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one["losses"]))
        print(f"{student}: 2 processes / 1: largest relative loss difference {worst:.1e}; peak memory per rank "
              f"{max(two['peak_memory_gib_by_rank']) / one['peak_memory_gib_by_rank'][0]:.2f}x")
    record = {"date": datetime.date.today().isoformat(), "machine": machine(), "runs": rows,
              "qwen3_8b_plans": plans}
    if out.exists() and set(students) != {"toy", "qwen3-shaped"}:  # a partial rerun replaces its students' runs
        old = json.loads(out.read_text())
        record["runs"] = [r for r in old["runs"] if r["student"] not in students] + rows
        record["qwen3_8b_plans"] = plans
    out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
