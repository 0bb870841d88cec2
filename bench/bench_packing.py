"""A step's loss work with padded micro-batches and with micro-batches by token budget, packed without padding.

    python bench/bench_packing.py --out bench/packing_cpu.json

A random Qwen3-architecture student with a long window (hidden 256, 4 layers, 4 query and 2 key-value heads,
the toy's 128-token vocabulary) and its frozen copy as the teacher. A step holds 32 prompts of 64 tokens, whose
responses have skewed lengths between 16 and 512 tokens (log-normal, median 64: most short, a few long, as
on-policy answers are); the teacher reads a 256-token context before each prompt, from its prefix cache (the
default). The step's work after sampling is timed: for each micro-batch, the teacher's forward, the student's
forward with the fused top-k loss, and the backward pass, as ``opcd distill`` runs them. Compared in one run:

* padded: ``--batch-size 8`` (4 micro-batches; each pass reads right-padded rows);
* packed at the same memory bound: ``--micro-batch-tokens 4608`` (8 rows of the longest sequence, 64 + 512:
  what a padded micro-batch of 8 may hold at most);
* packed at a smaller budget, ``--micro-batch-tokens 1152`` (2 such rows).

Reported: the share of the positions the passes read that are padding, the seconds of a step (median of 3
after a warm-up, float32, this machine's CPU threads), and the loss and gradient norm, which must agree.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory_plan import machine  # noqa: E402


def response_lengths(n: int, seed: int, low: int = 16, high: int = 512, median: float = 64.0) -> list[int]:
    """Skewed lengths: log-normal around ``median``, clipped to [low, high]."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.exp(torch.randn(n, generator=generator) * 0.9) * median
    return [int(min(max(x, low), high)) for x in draws.tolist()]


def main(argv=None) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opcd_cli import models
    from opcd_cli.forward import TeacherPrefix
    from opcd_cli.loss import DistillLoss
    from opcd_cli.micro_batches import Packer, by_prompts, by_token_budget, sequence_cost

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/packing_cpu.json")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--max-response", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", default="", help="token budgets, comma-separated (default: 1, 2, 4 and 8 "
                        "times the longest sequence)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    config = Qwen3Config(vocab_size=128, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    student = Qwen3ForCausalLM(config).train()
    teacher = models.frozen(copy.deepcopy(student))
    with torch.no_grad():  # a student that is not its teacher, as during training
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    loss = DistillLoss(student, teacher, 128, 16, False, 0.0, "torch")

    context = torch.randint(4, 128, (args.context,)).tolist()
    prompts = [torch.randint(4, 128, (args.prompt,)).tolist() for _ in range(args.sequences)]
    lengths = response_lengths(args.sequences, args.seed, high=args.max_response)
    responses = [torch.randint(4, 128, (n,)).tolist() for n in lengths]
    prefix = TeacherPrefix(context)
    prefix.past(teacher, 1)  # what a run pays once, before its steps
    tokens = sum(lengths)
    longest = args.prompt + args.max_response
    costs = [sequence_cost([args.prompt, args.prompt], n) for n in lengths]  # student and teacher after the prefix
    cpu = torch.device("cpu")
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else [longest * n for n in (1, 2, 4, 8)]
    setups = [(f"padded, --batch-size {args.batch_size}", Packer(0, cpu), by_prompts(args.sequences, args.batch_size))]
    for budget in budgets:  # one row per micro-batch; the teacher's after its prefix too
        setups.append((f"packed, --micro-batch-tokens {budget}", Packer(0, cpu, True, True),
                       by_token_budget(costs, budget)))

    def step(packer: Packer, batches: list[list[list[int]]]) -> tuple[float, float, float, int, int]:
        """(seconds, mean loss, gradient norm, padding positions, positions) of one step's loss work."""
        student.zero_grad(set_to_none=True)
        start, total, padding, positions = time.perf_counter(), 0.0, 0, 0
        for batch in batches:  # as distill.step.forward_loss_backward: the micro-batch's sequences row by row
            order, rows = [i for row in batch for i in row], [len(row) for row in batch]
            answers = [responses[i] for i in order]
            student_in = packer([prompts[i] for i in order], answers, rows)
            teacher_in = packer([context + prompts[i] for i in order], answers, rows, prefix)
            parts = loss.on_policy(student_in, teacher_in)
            (parts.total / tokens).backward()
            total += parts.total.item()
            padding += student_in.padding + teacher_in.padding
            positions += student_in.positions + teacher_in.positions
        seconds = time.perf_counter() - start
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in student.parameters() if p.grad is not None))
        return seconds, total / tokens, norm.item(), padding, positions

    rows = []
    for name, packer, groups in setups:
        step(packer, groups)  # warm-up
        runs = [step(packer, groups) for _ in range(args.repeats)]
        rows_read = sum(len(batch) for batch in groups)
        seconds = statistics.median(r[0] for r in runs)
        _, mean_loss, norm, padding, positions = runs[-1]
        rows.append({"setup": name, "micro_batches": len(groups), "rows": rows_read, "seconds": seconds, "loss": mean_loss,
                     "grad_norm": norm, "padding_positions": padding, "positions": positions,
                     "padding_share": padding / positions})
    base = rows[0]
    for row in rows:
        row["speedup_vs_padded"] = base["seconds"] / row["seconds"]
        print(f"{row['setup']:34s} {row['micro_batches']:2d} micro-batches of {row['rows']:2d} rows  padding {100 * row['padding_share']:5.1f}%  "
              f"step {row['seconds']:.3f} s ({row['speedup_vs_padded']:.2f}x)  loss {row['loss']:.6f}  "
              f"grad norm {row['grad_norm']:.6f}", flush=True)
    record = {"date": datetime.date.today().isoformat(), "machine": machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "sequences": args.sequences, "prompt_tokens": args.prompt,
              "context_tokens": args.context, "response_tokens": {"min": min(lengths), "median":
              statistics.median(lengths), "mean": tokens / len(lengths), "max": max(lengths)}, "results": rows}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
