"""Benchmark: the top-k reverse KL loss with its lm_head matmuls, forward + backward, provider by provider.

Commands (from the repository root):

    python bench/bench_topk_kl.py --check --sweep --out bench/topk_kl_gpu.json   # on a GPU: checks, sweep, shapes
    python bench/bench_topk_kl.py --out bench/topk_kl.json                 # GPU shapes on CUDA; small shapes on a CPU
    python bench/bench_topk_kl.py --smoke --out /tmp/topk_kl_smoke.json    # tiny shapes, a few seconds
    python bench/bench_topk_kl.py --cpu-memory --out bench/topk_kl_cpu_memory.json

The research companion of ``opcd bench loss``: the same shipped providers (``opcd_cli/benchmarks/loss_providers.py``:
eager, torch_chunked, liger_jsd_full, triton, matmul_floor), plus ``liger_topk`` and ``triton_c512``, the device
checks, the launch-configuration sweep and the CPU memory study. Providers, timed alternately within one run (student hidden h_s [N, H], weight W_s [V, H]; teacher h_t [N, M],
W_t [V, M]; loss = mean over tokens of sum_{i in top-k of z} p_i (log p_i - log q_i)):

* ``eager``: full materialisation: z = h_s W_s^T and t = h_t W_t^T for all tokens, float32 log_softmax of
  both, torch.topk, gather, autograd;
* ``torch_chunked``: the package's chunked PyTorch path (``fused_linear_topk_kl_torch``);
* ``liger_topk``: the same top-k loss as a ``LigerFusedLinearDistillationBase`` subclass (Liger's chunked
  torch.func loss; compiled with torch.compile on CUDA);
* ``liger_jsd_full``: Liger-Kernel's ``LigerFusedLinearJSD`` with beta = 1, the full-vocabulary reverse KL
  (CUDA only);
* ``triton``: the package's Triton path (``fused_linear_topk_kl_triton``, CUDA only);
* ``triton_c512``: the same with a 512 MiB chunk budget instead of the default (less memory, smaller matmuls);
* ``matmul_floor``: the four matmuls alone, chunk by chunk like the Triton path: z = h_s W_s^T, t = h_t W_t^T,
  dh_s = g W_s and dW_s += g^T h_s.

Reported per provider and shape: median, p20 and p80 of forward+backward milliseconds, peak memory above the
inputs (CUDA: ``max_memory_allocated``, and ``extra_mem_mb``: that peak less the gradients the step returns,
i.e. the memory beyond inputs, weights and their gradients; CPU: peak resident set size of a fresh subprocess, the kernel's
VmHWM mark (what ``ru_maxrss`` reports) reset once the inputs exist, less the resident size at that point),
TFLOP/s of the four matmuls' 2 N V (3 H + M) flops, device and library versions. ``--out`` writes JSON, or CSV
when the name ends in ``.csv``.

On CUDA, ``--check`` first compares the Triton paths with the PyTorch reference on the device (loss and
gradients; bf16 and float32; logits and fused linear; renorm; masks; float32 master weights under bf16
autocast) and ``--sweep`` times the forward kernel alone (with its fused gradient) at several launch
configurations. The default GPU providers leave out ``liger_topk`` (its torch.compile costs minutes).

``--cpu-memory`` measures what the CPU memory target is about: peak resident memory of ``eager`` and
``torch_chunked`` at N = 4096, V = 151936, H in {256, 512}, M = 512, k = 256 (float32), one fresh subprocess
at a time, and their ratio.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from opcd_cli.benchmarks import loss_providers as shipped  # noqa: E402  (the providers opcd bench loss runs)
from opcd_cli.benchmarks.loss_providers import make_inputs  # noqa: E402
from opcd_cli.kernels.torch_chunked import fused_linear_topk_kl_torch  # noqa: E402

PROVIDERS = ("eager", "torch_chunked", "liger_topk", "liger_jsd_full", "triton", "triton_c512", "matmul_floor")
GPU_DEFAULT_PROVIDERS = ("eager", "torch_chunked", "liger_jsd_full", "triton", "triton_c512", "matmul_floor")
CUDA_ONLY = ("liger_jsd_full", "triton", "triton_c512")
CPU_MEMORY_PROVIDERS = ("eager", "torch_chunked")

GPU_SHAPES = [dict(N=n, V=151936, H=h, M=m, k=256) for (h, m) in ((2048, 4096), (4096, 4096)) for n in (4096, 16384)]
CPU_SHAPES = [dict(N=512, V=32768, H=256, M=256, k=k) for k in (64, 256)]
SMOKE_SHAPES = [dict(N=64, V=2048, H=32, M=48, k=16)]
CPU_MEMORY_SHAPES = [dict(N=4096, V=151936, H=h, M=512, k=256) for h in (256, 512)]


# ----------------------------------------------------------------------------------------------- inputs


def matmul_flops(shape: dict) -> float:
    return 2.0 * shape["N"] * shape["V"] * (3 * shape["H"] + shape["M"])


# -------------------------------------------------------------------------------------------- providers


def triton_step(hs, ws, ht, wt, k, chunk_bytes=None):
    """The Triton path with another chunk budget than the shipped provider's default."""
    from opcd_cli.kernels.fused_linear_triton import TRITON_CHUNK_BYTES, fused_linear_topk_kl_triton

    fused_linear_topk_kl_triton(hs, ws, ht, wt, k=k, chunk_bytes=chunk_bytes or TRITON_CHUNK_BYTES).backward()


def liger_topk_function():
    """The top-k reverse KL written as a Liger chunked distillation loss (its base class does the chunking)."""
    from liger_kernel.chunked_loss.fused_linear_distillation import LigerFusedLinearDistillationBase

    class LigerTopkReverseKL(LigerFusedLinearDistillationBase):
        @staticmethod
        def distillation_loss_fn(student_logits, teacher_logits, target=None, ignore_index=-100, beta=None, k=256):
            logp = F.log_softmax(student_logits.float(), dim=-1)
            logq = F.log_softmax(teacher_logits.float(), dim=-1)
            ids = torch.topk(student_logits, k, dim=-1).indices
            lp, lq = logp.gather(-1, ids), logq.gather(-1, ids)
            return (lp.exp() * (lp - lq)).sum()  # the base class divides by the number of tokens

        @classmethod
        def forward(cls, ctx, hs, ws, ht, wt, target, k, compiled):
            return super().forward(
                cls=cls, ctx=ctx, student_input=hs, student_weight=ws, teacher_input=ht, teacher_weight=wt,
                target=target, weight_hard_loss=0.0, weight_soft_loss=1.0, compute_ce_loss=False,
                compiled=compiled, k=k,
            )

        @staticmethod
        def backward(ctx, grad_output, *args):
            grads = LigerFusedLinearDistillationBase.backward(ctx, grad_output, *args)
            return grads[0], grads[1], None, None, None, None, None

    return LigerTopkReverseKL


def make_liger_topk_step():
    fn = liger_topk_function()

    def step(hs, ws, ht, wt, k):
        target = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)
        fn.apply(hs, ws, ht, wt, target, k, hs.is_cuda).backward()

    return step


def make_step(provider: str):
    return {
        "eager": lambda: shipped.eager,
        "torch_chunked": lambda: shipped.torch_chunked,
        "liger_topk": make_liger_topk_step,
        "liger_jsd_full": lambda: shipped.liger_jsd,
        "triton": lambda: shipped.triton,
        "triton_c512": lambda: lambda *a: triton_step(*a, chunk_bytes=512 * 2**20),
        "matmul_floor": lambda: shipped.matmul_floor,
    }[provider]()


# ---------------------------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(step, inputs, k, device: str) -> float:
    hs, ws = inputs[0], inputs[1]
    hs.grad = ws.grad = None
    sync(device)
    start = time.perf_counter()
    step(*inputs, k)
    sync(device)
    return (time.perf_counter() - start) * 1e3


def percentile(values, q):
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def cuda_peak_mb(step, inputs, k) -> dict:
    """Peak allocated memory of one forward+backward above the inputs, and that less the gradients it returns."""
    hs, ws = inputs[0], inputs[1]
    hs.grad = ws.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(*inputs, k)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    grads = sum(g.numel() * g.element_size() for g in (hs.grad, ws.grad) if g is not None) / 2**20
    return {"peak_mem_mb": peak, "grad_mb": grads, "extra_mem_mb": peak - grads}


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS mark (VmHWM, what ru_maxrss reports) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_child(provider: str, shape: dict) -> dict:
    """Run in a fresh process: build inputs, then one forward+backward; peak RSS above the RSS with the inputs.

    The peak mark is reset once the inputs exist, so that import-time peaks do not hide small runs; where it
    cannot be reset, the plain ``ru_maxrss`` difference is used.
    """
    inputs = make_inputs(shape, "cpu", torch.float32)
    step = make_step(provider)
    gc.collect()
    if reset_peak_rss():
        base, method = proc_status_mb("VmRSS"), "VmHWM after reset, minus VmRSS with inputs"
        peak = lambda: proc_status_mb("VmHWM")  # noqa: E731
    else:
        base, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss difference"
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    ms = run_once(step, inputs, shape["k"], "cpu")
    return {"peak_mem_mb": peak() - base, "rss_with_inputs_mb": base, "single_run_ms": ms, "mem_method": method}


def cpu_peak_mb(provider: str, shape: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", provider, "--shape", json.dumps(shape)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit status {out.returncode}"]
        raise RuntimeError(f"memory subprocess failed: {tail[0]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- device checks and sweep


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (NaN never passes)."""
    ref, got = ref.detach().double(), got.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


CHECK_LIMITS = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # ||out - ref|| / ||ref||


def device_checks(device: str = "cuda", small: bool = False) -> list[dict]:
    """The Triton paths against the PyTorch reference on this device: loss and gradients, per case.

    ``small`` shrinks every shape (for a dry run on a CPU through Triton's interpreter)."""
    from opcd_cli.kernels.fused_linear_triton import fused_linear_topk_kl_triton
    from opcd_cli.kernels.naive import naive_topk_kl
    from opcd_cli.kernels.topk_kl_triton import topk_kl_triton

    rows = []
    gen = torch.Generator(device=device).manual_seed(1)

    def randn(*size, scale=1.0, dtype=torch.float32):
        return (torch.randn(size, device=device, generator=gen) * scale).to(dtype)

    def record(case, dtype, errs):
        limit = CHECK_LIMITS[dtype]
        row = dict(case=case, dtype=str(dtype).replace("torch.", ""), limit=limit, **errs)
        row["ok"] = all(v <= limit for v in errs.values())
        rows.append(row)
        print(f"  check {case:58s} {row['dtype']:8s} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items())
              + ("  ok" if row["ok"] else "  FAILED"), flush=True)

    # logits level: odd N, the real vocabulary, a mask, an upstream gradient other than 1, both sides
    for dtype in (torch.float32, torch.bfloat16):
        for renorm in (False, True):
            shapes = ((13, 1031, 16, False), (5, 517, 7, True)) if small else (
                (333, 151936, 256, False), (77, 50257, 200, True))
            for N, V, k, ties in shapes:
                a, b = randn(N, V, scale=3.0, dtype=dtype), randn(N, V, scale=3.0, dtype=dtype)
                if ties:  # whole numbers: thousands of ties at the k-th place, so the exact fallback runs too
                    a = a.float().round().to(dtype)
                mask = torch.rand(N, device=device, generator=gen) > 0.25
                up = torch.randn(N, device=device, generator=gen)
                got, ref = [], []
                for fn, out in ((topk_kl_triton, got), (naive_topk_kl, ref)):
                    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
                    loss_N = fn(a_, b_, k=k, mask=mask, renorm=renorm, reduction="none")
                    (loss_N * up).sum().backward()
                    out += [loss_N.detach(), a_.grad, b_.grad]
                record(f"logits N={N} V={V} k={k} renorm={renorm}" + (" ties" if ties else ""), dtype,
                       {"loss": rel_err(ref[0], got[0]), "grad_first": rel_err(ref[1], got[1]),
                        "grad_second": rel_err(ref[2], got[2])})
    # fused linear: the Triton path against the PyTorch path (same chunks, so the same logits)
    N, V, H, M = (40, 1031, 32, 48) if small else (1000, 151936, 2048, 4096)
    chunk = 16 if small else 256
    cases = [(torch.float32, False, False), (torch.bfloat16, False, False), (torch.bfloat16, True, False),
             (torch.float32, False, True)]  # the last: float32 master weights under bf16 autocast
    for dtype, renorm, autocast in cases:
        hs, ws = randn(N, H, dtype=dtype), randn(V, H, scale=3 * H**-0.5, dtype=dtype)
        ht = randn(N, M, dtype=torch.bfloat16 if autocast else dtype)
        wt = randn(V, M, scale=3 * M**-0.5, dtype=torch.bfloat16 if autocast else dtype)
        mask = torch.rand(N, device=device, generator=gen) > 0.25
        outs = {}
        for name, fn in (("triton", fused_linear_topk_kl_triton), ("torch", fused_linear_topk_kl_torch)):
            hs_, ws_ = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = fn(hs_, ws_, ht, wt, k=16 if small else 256, mask=mask, renorm=renorm, chunk_size=chunk)
            (loss * 1.5).backward()
            outs[name] = (loss.detach(), hs_.grad, ws_.grad)
        limit_dtype = torch.bfloat16 if autocast else dtype
        record(f"fused N={N} H={H} M={M} renorm={renorm}" + (" fp32 master+autocast" if autocast else ""),
               limit_dtype, {"loss": rel_err(outs["torch"][0], outs["triton"][0]),
                             "grad_hidden": rel_err(outs["torch"][1], outs["triton"][1]),
                             "grad_weight": rel_err(outs["torch"][2], outs["triton"][2])})
    return rows


SWEEP_CONFIGS = ((1024, 4), (2048, 4), (2048, 8), (4096, 8))


def kernel_sweep(N: int = 4096, V: int = 151936, k: int = 256, reps: int = 10) -> list[dict]:
    """The forward kernel alone (with its fused first-side gradient) on bf16 logits, per launch configuration.

    ``bytes_as_is``: what the kernel's passes move (a read 3 times, b once, the gradient written once);
    ``bytes_floor``: a and b read once and the gradient written once."""
    from opcd_cli.kernels.topk_kl_triton import topk_kl_forward

    gen = torch.Generator(device="cuda").manual_seed(0)
    a0 = (torch.randn(N, V, device="cuda", generator=gen) * 3).bfloat16()
    b = (torch.randn(N, V, device="cuda", generator=gen) * 3).bfloat16()
    a = torch.empty_like(a0)
    w = torch.full((N,), 1.0 / N, device="cuda")
    as_is, floor = 5 * N * V * 2, 3 * N * V * 2
    rows = []
    for block_v, warps in SWEEP_CONFIGS:
        times = []
        try:
            for r in range(reps + 2):
                a.copy_(a0)  # the gradient is written over the logits: restore them, untimed
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                topk_kl_forward(a, b, k, False, weight_N=w, grad_first=True, block_v=block_v,
                                num_warps=warps)
                end.record()
                torch.cuda.synchronize()
                if r >= 2:
                    times.append(start.elapsed_time(end))
        except Exception as err:
            rows.append(dict(block_v=block_v, num_warps=warps, status="error", reason=str(err).splitlines()[0][:200]))
            continue
        ms = statistics.median(times)
        rows.append(dict(block_v=block_v, num_warps=warps, status="ok", N=N, V=V, k=k, median_ms=ms,
                         p20_ms=percentile(times, 0.2), p80_ms=percentile(times, 0.8),
                         gbps_as_is=as_is / ms / 1e6, gbps_floor=floor / ms / 1e6))
        print(f"  sweep BLOCK_V={block_v:5d} warps={warps:2d}: {ms:7.3f} ms, {as_is / ms / 1e6:7.0f} GB/s as moved, "
              f"{floor / ms / 1e6:7.0f} GB/s of the one-pass floor", flush=True)
    return rows


def target_summary(rows: list[dict]) -> list[dict]:
    """Per shape: Triton against the four-matmul floor and against Liger, and its memory beyond gradients."""
    out = []
    shapes = sorted({(r["N"], r["H"], r["M"], r["k"]) for r in rows})
    for N, H, M, k in shapes:
        got = {r["provider"]: r for r in rows if (r["N"], r["H"], r["M"], r["k"]) == (N, H, M, k) and r["status"] == "ok"}
        for name in ("triton", "triton_c512"):
            if name not in got:
                continue
            t = got[name]["median_ms"]
            row = dict(N=N, H=H, M=M, k=k, provider=name, ms=t, extra_mem_mb=got[name].get("extra_mem_mb"))
            if "matmul_floor" in got:
                row["x_floor"] = t / got["matmul_floor"]["median_ms"]
            if "liger_jsd_full" in got:
                row["liger_over_triton"] = got["liger_jsd_full"]["median_ms"] / t
            if "torch_chunked" in got:
                row["torch_chunked_over_triton"] = got["torch_chunked"]["median_ms"] / t
            out.append(row)
    for r in out:
        num = lambda key, fmt: format(r[key], fmt) if isinstance(r.get(key), (int, float)) else "-"  # noqa: E731
        print(f"  {r['provider']:12s} N={r['N']:6d} H={r['H']} M={r['M']}: {num('ms', '.2f')} ms, "
              f"{num('x_floor', '.3f')}x floor (target <= 1.3), Liger/Triton {num('liger_over_triton', '.2f')} "
              f"(target >= 1.5), extra memory {num('extra_mem_mb', '.0f')} MiB (target <= 3072)")
    return out


# ----------------------------------------------------------------------------------------------- driver


def bench_shape(shape: dict, providers, device: str, dtype, reps: int, warmup: int) -> list[dict]:
    rows, steps = [], {}
    base = dict(shape, device=device, dtype=str(dtype).replace("torch.", ""))
    for p in providers:
        if p in CUDA_ONLY and device != "cuda":
            rows.append(dict(base, provider=p, status="skipped", reason="needs CUDA"))
            continue
        try:
            steps[p] = make_step(p)
        except Exception as err:  # a provider's package missing, or not importable beside this torch
            rows.append(dict(base, provider=p, status="skipped", reason=f"import failed: {err}"))
    inputs = make_inputs(shape, device, dtype)
    times = {p: [] for p in steps}
    failed = {}
    for p in list(steps):
        try:
            for _ in range(warmup):
                run_once(steps[p], inputs, shape["k"], device)
        except Exception as err:  # an out-of-memory eager run, a missing kernel: record it and go on
            failed[p] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            del steps[p]
            if device == "cuda":
                torch.cuda.empty_cache()
    order = list(steps)
    for r in range(reps if order else 0):  # alternate providers, rotating who goes first
        first = r % len(order)
        for p in order[first:] + order[:first]:
            times[p].append(run_once(steps[p], inputs, shape["k"], device))
    for p in order:
        row = dict(base, provider=p, status="ok", reps=reps)
        row.update(
            median_ms=statistics.median(times[p]), p20_ms=percentile(times[p], 0.2), p80_ms=percentile(times[p], 0.8)
        )
        row["tflops"] = matmul_flops(shape) / (row["median_ms"] * 1e-3) / 1e12
        rows.append(row)
    for p, reason in failed.items():
        rows.append(dict(base, provider=p, status="error", reason=reason))
    del inputs
    gc.collect()
    # memory, after timing: in-process on CUDA, in a fresh subprocess per provider on a CPU
    for row in rows:
        if row["status"] != "ok":
            continue
        try:
            if device == "cuda":
                row.update(cuda_peak_mb(steps[row["provider"]], make_inputs(shape, device, dtype), shape["k"]))
            else:
                row.update(cpu_peak_mb(row["provider"], shape))
        except Exception as err:
            row["mem_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return rows


def cpu_memory_rows(shapes) -> list[dict]:
    rows = []
    for shape in shapes:
        for p in CPU_MEMORY_PROVIDERS:  # one fresh subprocess at a time
            row = dict(shape, device="cpu", dtype="float32", provider=p, status="ok")
            try:
                row.update(cpu_peak_mb(p, shape))
            except Exception as err:
                row.update(status="error", reason=str(err))
            rows.append(row)
            print(f"  {p:14s} N={shape['N']} V={shape['V']} H={shape['H']} M={shape['M']} k={shape['k']}: "
                  f"{row.get('peak_mem_mb', float('nan')):9.1f} MiB above inputs", flush=True)
        peaks = {r["provider"]: r.get("peak_mem_mb") for r in rows[-len(CPU_MEMORY_PROVIDERS):]}
        if peaks.get("eager") and peaks.get("torch_chunked"):
            rows[-1]["ratio_to_eager"] = peaks["torch_chunked"] / peaks["eager"]
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(device: str, argv) -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + list(argv)),
        "device": (
            torch.cuda.get_device_name() if device == "cuda" else f"{cpu_model()} ({os.cpu_count()} logical cores)"
        ),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for lib in ("triton", "liger_kernel"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:
            from importlib.metadata import PackageNotFoundError, version

            try:
                info[lib] = version(lib.replace("_", "-"))
            except PackageNotFoundError:
                info[lib] = "not installed"
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def write(path: str, info: dict, rows: list[dict], extra: dict | None = None) -> None:
    if path.endswith(".csv"):
        keys = sorted({key for row in rows for key in row})
        with open(path, "w", newline="") as f:
            f.write("# " + json.dumps(info) + "\n")
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    else:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": info, "results": rows, **(extra or {})}, f, indent=1)
        os.replace(tmp, path)


def print_table(rows: list[dict]) -> None:
    """Times in ms; ``1 run`` is the memory subprocess's single forward+backward (CPU only)."""
    head = (
        f"{'provider':15s} {'N':>6s} {'V':>7s} {'H':>5s} {'M':>5s} {'k':>4s} {'median':>9s} {'p20':>9s} {'p80':>9s} "
        f"{'TFLOP/s':>8s} {'peak MiB':>9s} {'extra MiB':>9s} {'1 run':>9s}  status"
    )
    print(head)
    for r in rows:
        num = lambda key, fmt: format(r[key], fmt) if isinstance(r.get(key), (int, float)) else "-"  # noqa: E731
        print(
            f"{r['provider']:15s} {r['N']:6d} {r['V']:7d} {r['H']:5d} {r['M']:5d} {r['k']:4d} "
            f"{num('median_ms', '9.2f'):>9s} {num('p20_ms', '9.2f'):>9s} {num('p80_ms', '9.2f'):>9s} "
            f"{num('tflops', '8.3f'):>8s} {num('peak_mem_mb', '9.1f'):>9s} {num('extra_mem_mb', '9.1f'):>9s} "
            f"{num('single_run_ms', '9.0f'):>9s}  "
            f"{r['status']} {r.get('reason', r.get('mem_error', ''))}"
        )
    for r in rows:
        if "ratio_to_eager" in r:
            print(f"H={r['H']}: torch_chunked peak / eager peak = {r['ratio_to_eager']:.4f} (target <= 0.2)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results here (JSON, or CSV for *.csv)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds")
    parser.add_argument("--cpu-memory", action="store_true", help="CPU peak memory: eager vs torch_chunked")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated subset of {PROVIDERS} (default: all; on a GPU all but liger_topk)")
    parser.add_argument("--check", action="store_true", help="CUDA: Triton against the PyTorch reference first")
    parser.add_argument("--sweep", action="store_true", help="CUDA: the forward kernel alone per launch config")
    parser.add_argument("--no-shapes", action="store_true", help="skip the provider timings (checks/sweep only)")
    parser.add_argument("--tokens", type=int, default=None, help="GPU: only the shapes with this many tokens N")
    parser.add_argument("--reps", type=int, default=None, help="timed runs each (default 20 GPU, 5 CPU, 3 smoke)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    if args.memory_child:
        print(json.dumps(cpu_peak_child(args.memory_child, json.loads(args.shape))))
        return 0

    device = "cuda" if torch.cuda.is_available() and not args.cpu_memory else "cpu"
    info = meta(device, argv)
    print(json.dumps(info))
    extra = {}
    if device == "cuda" and args.check:
        extra["checks"] = device_checks()
        if args.out:  # written as soon as they exist: a later failure keeps them
            write(args.out, info, [], extra)
    if device == "cuda" and args.sweep:
        extra["sweep"] = kernel_sweep()
        if args.out:
            write(args.out, info, [], extra)
    rows = []
    if args.cpu_memory:
        rows = cpu_memory_rows(CPU_MEMORY_SHAPES)
    elif not args.no_shapes:
        default = GPU_DEFAULT_PROVIDERS if device == "cuda" and not args.smoke else PROVIDERS
        providers = [p.strip() for p in (args.providers or ",".join(default)).split(",") if p.strip()]
        unknown = sorted(set(providers) - set(PROVIDERS))
        if unknown:
            parser.error(f"unknown providers {unknown}; choose from {PROVIDERS}")
        if args.smoke:
            shapes, reps, warmup = SMOKE_SHAPES, args.reps or 3, 1
        elif device == "cuda":
            shapes, reps, warmup = [s for s in GPU_SHAPES if args.tokens in (None, s["N"])], args.reps or 20, 2
        else:
            shapes, reps, warmup = CPU_SHAPES, args.reps or 5, 1
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        for shape in shapes:
            rows += bench_shape(shape, providers, device, dtype, reps, warmup)
            if args.out:
                write(args.out, info, rows, extra)
    print_table(rows)
    if device == "cuda" and rows:
        extra["targets"] = target_summary(rows)
    if args.out:
        write(args.out, info, rows, extra)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
