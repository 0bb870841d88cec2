"""``opcd bench loss``: the fused top-k reverse-KL loss, forward and backward, against its alternatives
(``loss_providers.py``) at chosen shapes: time (median and spread over repeats, the providers taking turns so
that a busy machine slows them alike), peak memory beyond the inputs, the ratios that survive a change of machine
(time over the four-matmul floor of the same shape and run; each provider over opcd's own path), and each
provider's loss and gradients against the naive reference at that shape.

Presets (``PRESETS``): ``cpu-smoke``, small shapes that run in well under a minute on a 2-core CPU (the shapes
the project's CI gates on); ``paper``, the paper's shapes for an H100 or H200 (a Qwen3-1.7B student's hidden
size 2048 and a Qwen3-8B teacher's 4096, the Qwen3 vocabulary of 151,936, top-k 256, 4,096 and 16,384 tokens).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..errors import OpcdError
from .loss_providers import PROVIDERS, check, make_inputs, opcd_provider
from .machine import machine_info, peak_memory, summary, sync

PRESETS = {
    "cpu-smoke": [dict(N=256, V=32768, H=128, M=192, k=64), dict(N=512, V=16384, H=128, M=128, k=256)],
    "paper": [dict(N=n, V=151936, H=2048, M=4096, k=256) for n in (4096, 16384)],
}
DEFAULT_PROVIDERS = ("torch_chunked", "eager", "trl_topk", "liger_jsd", "triton", "matmul_floor")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GATED = {"slower": ["time_over_floor"], "memory": ["peak_mb"], "values": ["loss"], "correct": ["ok"]}


def shape_name(shape: dict) -> str:
    return "N{N}-V{V}-H{H}-M{M}-k{k}".format(**shape)


def choose_providers(names: list[str] | None, dev: str) -> tuple[list[str], list[dict]]:
    """The providers that run here, and why each left out does not; an unknown name is one line. By default
    Triton runs on a GPU only (in the interpreter it is for tiny shapes, asked for by name)."""
    asked = list(names) if names else list(DEFAULT_PROVIDERS)
    unknown = [n for n in asked if n not in PROVIDERS]
    if unknown:
        raise OpcdError(f"--providers: no provider {unknown[0]!r}; choose from {', '.join(PROVIDERS)}")
    if "matmul_floor" not in asked:
        asked.append("matmul_floor")  # every ratio is taken over it
    running, skipped = [], []
    for name in asked:
        why = PROVIDERS[name].unavailable(dev)
        if why is None and name == "triton" and dev == "cpu" and not names:
            why = "the interpreter is for tiny shapes: ask for it by name"
        (skipped.append({"name": name, "why": why}) if why else running.append(name))
    return running, skipped


def time_providers(names: list[str], shape: dict, dev: str, dtype, repeats: int, warmup: int,
                   advance: Callable[[], None] | None = None) -> tuple[dict[str, list[float]], dict]:
    """Milliseconds of forward + backward per provider, the providers taking turns in each round: on a GPU wall
    time (synchronised), on a CPU the process's CPU time (``time.process_time``: what the work cost, not how long
    other processes on the machine kept it waiting); and each provider's loss on these inputs (None: no loss)."""
    clock = time.perf_counter if dev == "cuda" else time.process_time
    inputs = make_inputs(shape, dev, dtype)
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict = {}
    for round_ in range(warmup + repeats):
        for name in names:
            inputs[0].grad = inputs[1].grad = None
            sync(dev)
            start = clock()
            loss = PROVIDERS[name].step(*inputs, shape["k"])
            sync(dev)
            if round_ >= warmup:
                times[name].append((clock() - start) * 1e3)
            losses[name] = None if loss is None else loss.item()  # outside the timed span
        if advance:
            advance()
    return times, losses


def memory_of(names: list[str], shape: dict, dev: str, dtype_name: str) -> dict[str, float | None]:
    """Peak MiB of one forward + backward above the inputs (the gradients it returns included), per provider:
    CUDA's allocator here; on a CPU, a fresh process's resident peak (``cpu_memory.py``)."""
    if dev == "cpu":
        from .cpu_memory import measure

        return measure(shape, names, dtype_name)
    peaks = {}
    for name in names:
        inputs = make_inputs(shape, dev, DTYPES[dtype_name])
        with peak_memory(dev) as found:
            PROVIDERS[name].step(*inputs, shape["k"])
        peaks[name] = found["peak_mb"]
    return peaks


def round_ratio(times: list[float], over: list[float]) -> float:
    """The median over rounds of one provider's time over another's in the same round: a slow moment of the
    machine slows both and cancels out (bench/RESULTS.md: how far five runs move)."""
    return statistics.median(a / b for a, b in zip(times, over))


def bench_loss(shapes: list[dict], providers: list[str] | None = None, dtype: str | None = None, repeats: int = 10,
               warmup: int = 2, progress=None, preset: str | None = None, threads: int | None = None) -> dict:
    """Every provider that runs here at every shape: one result row each (``opcd bench loss --json``). On a CPU
    the timings run on ``threads`` threads (default 1: a shared CPU's other core makes two-thread times jump)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    before = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if dev == "cpu" else before))
    try:
        result = _bench_loss(shapes, providers, dtype, repeats, warmup, progress, preset, dev)
    finally:
        torch.set_num_threads(before)
    result["threads"] = threads or (1 if dev == "cpu" else before)
    return result


def _bench_loss(shapes, providers, dtype, repeats, warmup, progress, preset, dev) -> dict:
    dtype_name = dtype or ("bfloat16" if dev == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise OpcdError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype_name!r}")
    torch_dtype = DTYPES[dtype_name]
    names, skipped = choose_providers(providers, dev)
    opcd = opcd_provider(dev)
    rows = []
    for shape in shapes:
        advance = progress.task(f"loss {shape_name(shape)}", warmup + repeats) if progress else None
        times, losses = time_providers(names, shape, dev, torch_dtype, repeats, warmup, advance)
        stats = {name: summary(times[name]) for name in names}
        peaks = memory_of(names, shape, dev, dtype_name)
        for name in names:
            row = {"name": name, "shape": shape_name(shape), **shape, **stats[name],
                   "time_over_floor": round_ratio(times[name], times["matmul_floor"]),
                   "over_opcd": round_ratio(times[name], times[opcd]) if opcd in times else None,
                   "peak_mb": peaks[name]}
            if PROVIDERS[name].reference is not None:
                row |= check(PROVIDERS[name], shape, dev, torch_dtype) | {"loss": losses[name]}
            rows.append(row)
    return {"bench": "loss", "preset": preset, "dtype": dtype_name, "repeats": repeats, "opcd_provider": opcd,
            "clock": "wall" if dev == "cuda" else "cpu time",
            "machine": machine_info(dev), "rows": rows, "skipped": skipped, "gated": GATED}


def parse_shape(tokens: int, vocab: int, hidden: int, teacher_hidden: int | None, topk: int) -> dict:
    shape = dict(N=tokens, V=vocab, H=hidden, M=teacher_hidden or hidden, k=topk)
    for key, value in shape.items():
        if value < 1:
            raise OpcdError(f"the shape's {key} must be at least 1; got {value}")
    if shape["k"] > shape["V"]:
        raise OpcdError(f"--topk {topk} is more than --vocab {vocab}")
    return shape
