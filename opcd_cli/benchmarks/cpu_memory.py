"""Peak memory of each loss provider on a CPU, measured in a fresh process: the process's peak resident size
(its kernel mark, VmHWM, reset once the inputs exist) above its resident size with the inputs. Every allocation
above 64 KiB is made to map its own pages and give them back when freed (glibc's ``mallopt``), so the peak is
that of the live tensors, not of what the allocator happened to keep from earlier work: the same number run
after run. Each provider runs once on a tiny shape first, so that importing its library is not counted.

    python -m opcd_cli.benchmarks.cpu_memory '{"N": 256, "V": 8192, "H": 128, "M": 160, "k": 64}' eager,torch_chunked
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def measure_here(shape: dict, names: list[str], dtype_name: str) -> dict[str, float | None]:

    from .loss_bench import DTYPES
    from .loss_providers import PROVIDERS, make_inputs

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 0)
    except OSError:
        pass  # not glibc: the plain peak mark, less repeatable
    dtype = DTYPES[dtype_name]
    for name in names:  # imports and first-call set-up, not counted
        PROVIDERS[name].step(*make_inputs(dict(N=4, V=64, H=8, M=8, k=4), "cpu", dtype), 4)
    peaks: dict[str, float | None] = {}
    for name in names:
        inputs = make_inputs(shape, "cpu", dtype)
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            peaks[name] = None
            continue
        base = _status_mb("VmRSS")
        PROVIDERS[name].step(*inputs, shape["k"])
        peaks[name] = round(max(0.0, _status_mb("VmHWM") - base), 1)
        del inputs
        gc.collect()
    return peaks


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(shape: dict, names: list[str], dtype_name: str) -> dict[str, float | None]:
    """``measure_here`` in a fresh process; None for every provider where that process cannot tell."""
    command = [sys.executable, "-m", "opcd_cli.benchmarks.cpu_memory", json.dumps(shape), ",".join(names), dtype_name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {name: None for name in names}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure_here(json.loads(sys.argv[1]), sys.argv[2].split(","), sys.argv[3])))
