"""The teacher's forward per micro-batch with and without the prefix cache, at several context lengths.

    python bench/bench_teacher_prefix.py --out bench/teacher_prefix_cpu.json

A random Qwen3-architecture teacher with a long window (hidden 256, 4 layers, 4 query and 2 key-value heads;
over the toy's 128-token vocabulary: the teacher's output layer is not what this measures) reads, for each of
8 rows, a shared context of C tokens, a 24-token question and a 256-token response, as ``opcd distill``'s
teacher does in a step (``loss.with_head`` on the fused path, no gradient). Without the cache it reads all
C + 280 tokens of every row; with it, the context's keys and values are computed once (the "once" column, paid
once a run) and every micro-batch reads 280 tokens a row against them. Median of 5 micro-batches after one
warm-up, float32, on this machine's CPU threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory_plan import machine  # noqa: E402


def main(argv=None) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opcd_cli.forward import TeacherPrefix, with_head

    from opcd_cli.micro_batches import pack

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/teacher_prefix_cpu.json")
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=128, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
    teacher = Qwen3ForCausalLM(config).eval().requires_grad_(False)
    rows = []
    for context in map(int, args.contexts.split(",")):
        shared = torch.randint(4, 128, (context,)).tolist()
        prompts = [shared + torch.randint(4, 128, (24,)).tolist() for _ in range(args.rows)]
        responses = [torch.randint(4, 128, (args.response,)).tolist() for _ in range(args.rows)]
        prefix = TeacherPrefix(shared)
        once_start = time.perf_counter()
        prefix.past(teacher, 1)  # what a run pays once
        once = time.perf_counter() - once_start

        def forward(cached: bool) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                with_head(teacher, pack(prompts, responses, 0, "cpu", prefix if cached else None), True,
                          lambda head: head.hidden_NH.sum())
            return time.perf_counter() - start

        times = {}
        for cached in (False, True):
            forward(cached)
            times[cached] = statistics.median(forward(cached) for _ in range(args.repeats))
        row = {"context_tokens": context, "rows": args.rows, "response_tokens": args.response,
               "plain_seconds": times[False], "cached_seconds": times[True], "prefix_once_seconds": once,
               "speedup": times[False] / times[True]}
        rows.append(row)
        print(f"context {context:5d}: teacher forward {times[False]:.3f} s without the cache, {times[True]:.3f} s "
              f"with it ({row['speedup']:.1f}x faster); the prefix once: {once:.3f} s", flush=True)
    record = {"date": datetime.date.today().isoformat(), "machine": machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "results": rows}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
