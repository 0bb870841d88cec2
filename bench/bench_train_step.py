"""Benchmark: one OPCD training step at the paper's model sizes, phase by phase, with each loss implementation.

The research companion of ``opcd bench step`` (its shape presets and model building), which it extends with
timed rollouts and a rollout profile.

Commands (from the repository root):

    python bench/bench_train_step.py --out bench/train_step_gpu.json        # a GPU: 1.7B-shaped student, 8B teacher
    python bench/bench_train_step.py --size tiny --out /tmp/step.json       # anywhere: tiny models, seconds

Models: Qwen3-architecture configs with random weights, built in place (nothing is downloaded). ``1.7b-8b``:
the student shaped like Qwen3-1.7B (hidden 2048, 28 layers, tied embeddings, vocabulary 151,936) in float32
master weights, as ``opcd distill`` keeps it, and the teacher shaped like Qwen3-8B (hidden 4096, 36 layers) in
bf16; everything runs under bf16 autocast on a GPU (the trainer's ``--dtype auto``). ``tiny``: the same
architecture a few layers deep, for a CPU.

One step, as ``opcd_cli.distill.step.take_step`` does it, each phase timed with ``opcd_cli.timing.StepTimer`` (CUDA
events, read once per step): ``teacher_forward`` (the teacher's final hidden states on [context; prompt;
response]), ``student_forward``, ``loss`` (the fused top-k reverse KL with the output layers' matmuls and the
gradients they produce), ``backward`` (through the student), ``optimizer`` (gradient clipping and AdamW).
Rollouts are timed once before the steps (the default Hugging Face sampler, on the live student:
``--prompts`` prompts of ``--prompt-tokens`` random ids, ``--response-tokens`` new tokens at temperature 1; a
random-weight model almost never stops early, so every response runs to the limit) and the steps train on
those very responses. ``--kernels`` lists the loss implementations (``OPCD_KERNEL``); the first step of each
is a warm-up. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from opcd_cli.benchmarks import step_bench
from opcd_cli.loss import DistillLoss  # noqa: E402
from opcd_cli.config import SamplingOptions  # noqa: E402
from opcd_cli.sampling import make_sampler  # noqa: E402
from opcd_cli.micro_batches import pack
from opcd_cli.timing import StepTimer  # noqa: E402

SIZES = {  # (student, teacher): opcd bench step's shape presets (opcd_cli/benchmarks/step_bench.py)
    "1.7b-8b": ("qwen3-1.7b", "qwen3-8b"),
    "tiny": ("tiny", "tiny-teacher"),
}
PHASES = ("teacher_forward", "student_forward", "loss", "backward", "optimizer")


def build(name: str, dtype: torch.dtype, device: torch.device):
    """A random-weight model of a shape preset, as ``opcd bench step`` builds it."""
    return step_bench.build(step_bench.model_config(name), dtype, device.type)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def one_step(loss_fn, optimizer, student_in, teacher_in, n_tokens: int, timer: StepTimer, device) -> torch.Tensor:
    """``opcd bench step``'s step (``step_bench.train_step``)."""
    return step_bench.train_step(loss_fn, optimizer, student_in, teacher_in, n_tokens, timer, device.type)


def timed_generate(sampler, prompts, new_tokens: int, device) -> tuple[list[list[int]], float]:
    options = SamplingOptions(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast(device):
        responses = sampler.generate(prompts, options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return responses, time.perf_counter() - start


def rollout_probe(sampler, prompts, device) -> dict:
    """Where rollout time goes: generate at 32 and 128 new tokens (the slope is the cost of one decoding step)
    and the top operations of 16 tokens under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    timed_generate(sampler, prompts, 4, device)  # warm-up
    times = {n: timed_generate(sampler, prompts, n, device)[1] for n in (32, 128)}
    per_step = (times[128] - times[32]) / 96
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        timed_generate(sampler, prompts, 16, device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(f"generate: 32 tokens {times[32]:.2f} s, 128 tokens {times[128]:.2f} s, {per_step * 1e3:.1f} ms per step")
    print(table, flush=True)
    return {"seconds_32": times[32], "seconds_128": times[128], "seconds_per_step": per_step, "profile": table}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 1.7b-8b on a GPU, tiny on a CPU")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--context-tokens", type=int, default=1024, help="tokens of context the teacher reads first")
    parser.add_argument("--response-tokens", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per kernel, after one warm-up step")
    parser.add_argument("--kernels", default="triton,torch", help="loss implementations, in order (OPCD_KERNEL)")
    parser.add_argument("--rollouts", choices=("generate", "random"), default="generate",
                        help="sample the responses (timed), or draw random ids of the full length (steps only)")
    parser.add_argument("--rollout-probe", action="store_true",
                        help="also time generate at 32 and 128 new tokens and profile 16 of them")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("1.7b-8b" if device.type == "cuda" else "tiny")
    student_name, teacher_name = SIZES[size]
    vocab = min(step_bench.model_config(student_name).vocab_size, step_bench.model_config(teacher_name).vocab_size)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if device.type == "cpu":
        kernels = [k for k in kernels if k != "triton"] or ["torch"]  # the Triton path needs a GPU
    torch.manual_seed(0)
    started = time.perf_counter()
    student = build(student_name, torch.float32, device).train()  # float32 master weights
    teacher = build(teacher_name, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    teacher.requires_grad_(False).eval()
    build_s = time.perf_counter() - started
    info = {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/bench_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} logical cores",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "size": size,
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "prompts": args.prompts,
        "prompt_tokens": args.prompt_tokens,
        "context_tokens": args.context_tokens,
        "response_tokens": args.response_tokens,
        "topk": args.topk,
        "build_s": round(build_s, 1),
    }
    try:
        import transformers
        import triton

        info.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    print(json.dumps(info), flush=True)

    gen = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab - 1, (args.context_tokens,), generator=gen).tolist()
    prompts = [torch.randint(0, vocab - 1, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.prompts)]

    # Rollouts: the default sampler on the live float32 student under autocast, as the trainer runs it.
    tokenizer = SimpleNamespace(eos_token_id=vocab - 1, pad_token_id=0)  # random ids never include vocab - 1
    sampler = make_sampler("hf", tokenizer=tokenizer, model=student, batch_size=args.prompts)
    result = {"meta": info}
    if args.rollout_probe:
        result["rollout_probe"] = rollout_probe(sampler, prompts, device)
    if args.rollouts == "generate":
        responses, rollout_s = timed_generate(sampler, prompts, args.response_tokens, device)
        n_tokens = sum(map(len, responses))
        result["rollout"] = {"seconds": rollout_s, "tokens": n_tokens, "tokens_per_s": n_tokens / rollout_s}
        print(f"rollouts: {n_tokens} tokens in {rollout_s:.2f} s ({n_tokens / rollout_s:.0f} tokens/s)", flush=True)
    else:
        responses = [torch.randint(0, vocab - 1, (args.response_tokens,), generator=gen).tolist() for _ in prompts]
        n_tokens = sum(map(len, responses))

    student_in = pack(prompts, responses, 0, device)
    teacher_in = pack([context + p for p in prompts], responses, 0, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, weight_decay=0.0)
    loss_fn = DistillLoss(student, teacher, vocab, args.topk, False)  # the top-k reverse KL, built once
    result["kernels"] = {}
    for kernel in kernels:
        os.environ["OPCD_KERNEL"] = kernel
        timer = StepTimer(device)
        one_step(loss_fn, optimizer, student_in, teacher_in, n_tokens, timer, device)
        timer.seconds()  # warm-up: compilation, optimiser state
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        steps, losses = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = one_step(loss_fn, optimizer, student_in, teacher_in, n_tokens, timer, device)
            phases = timer.seconds()  # the step's one synchronisation
            steps.append(dict(phases, step_s=time.perf_counter() - t0))
            losses.append(float(loss) / n_tokens)
        summary = {key: statistics.median(s[key] for s in steps) for key in (*PHASES, "step_s")}
        summary["losses"] = losses
        if device.type == "cuda":
            summary["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["kernels"][kernel] = {"median": summary, "steps": steps}
        shares = " ".join(f"{p} {summary[p]:.3f}s" for p in PHASES)
        print(f"{kernel:7s} step {summary['step_s']:.3f} s: {shares}"
              + (f"; peak {summary['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in summary else ""), flush=True)
    if {"triton", "torch"} <= set(result["kernels"]):
        t, p = result["kernels"]["triton"]["median"], result["kernels"]["torch"]["median"]
        result["torch_over_triton"] = {"loss": p["loss"] / t["loss"], "step": p["step_s"] / t["step_s"]}
        print(f"torch / triton: loss phase {p['loss'] / t['loss']:.2f}x, whole step {p['step_s'] / t['step_s']:.2f}x")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
