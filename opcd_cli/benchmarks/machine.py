"""What a benchmark needs from the machine: which device kind it ran on (a baseline is only compared on the same
kind), the versions that make its numbers, times as a median with their spread, and peak memory beyond what
existed before a piece of work (CUDA's allocator; on a CPU, ``cpu_memory.py``)."""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import time
from contextlib import contextmanager

import torch


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_kind(dev: str) -> str:
    """``cpu`` for any CPU; the GPU's name (``NVIDIA H100 80GB HBM3``) on CUDA: what a baseline must match."""
    return torch.cuda.get_device_name() if dev == "cuda" else "cpu"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(dev: str) -> dict:
    """The device kind, the machine and the versions a benchmark's numbers depend on."""
    return {"device_kind": device_kind(dev), "cpu": cpu_model(), "cores": os.cpu_count(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            **{name: version(name) for name in ("opcd", "torch", "triton", "liger-kernel", "trl", "transformers")}}


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(times_ms: list[float]) -> dict:
    """Median, 20th and 80th percentiles, the spread (p80 - p20) / median, and the fastest run."""
    median = percentile(times_ms, 0.5)
    p20, p80 = percentile(times_ms, 0.2), percentile(times_ms, 0.8)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "spread": (p80 - p20) / median if median else 0.0,
            "min_ms": min(times_ms)}


@contextmanager
def peak_memory(dev: str):
    """Measures the peak memory of the block above what was in use when it began, in MiB, from CUDA's allocator:
    yields a dict whose ``peak_mb`` is filled when the block ends, and stays ``None`` on a CPU (whose resident
    peak depends on what the allocator kept from earlier work; ``cpu_memory.py`` measures the loss providers
    there in a fresh process)."""
    found: dict = {"peak_mb": None}
    if dev != "cuda":
        yield found
        return
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield found
    torch.cuda.synchronize()
    found["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20


def calibration_ms(dev: str, repeats: int = 5) -> float:
    """The median time of a fixed float32 matmul workload: a yardstick of this machine's speed, measured in the
    same process as the work it normalises (times over it survive a change of machine better than seconds)."""
    a = torch.randn(512, 512, device=dev)
    times = []
    for _ in range(repeats + 1):
        sync(dev)
        start = time.perf_counter()
        for _ in range(8):
            a = torch.tanh(a @ a)
        sync(dev)
        times.append((time.perf_counter() - start) * 1e3)
    return percentile(times[1:], 0.5)
