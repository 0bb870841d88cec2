"""Benchmark: the top-k reverse KL loss with its lm_head matmuls, forward + backward, provider by provider.

Commands (from the repository root):

    python bench/bench_topk_kl.py --out bench/topk_kl.json                 # GPU shapes on CUDA; small shapes on a CPU
    python bench/bench_topk_kl.py --smoke --out /tmp/topk_kl_smoke.json    # tiny shapes, a few seconds
    python bench/bench_topk_kl.py --cpu-memory --out bench/topk_kl_cpu_memory.json

Providers, timed alternately within one run (student hidden h_s [N, H], weight W_s [V, H]; teacher h_t [N, M],
W_t [V, M]; loss = mean over tokens of sum_{i in top-k of z} p_i (log p_i - log q_i)):

* ``eager``: full materialisation: z = h_s W_s^T and t = h_t W_t^T for all tokens, float32 log_softmax of
  both, torch.topk, gather, autograd;
* ``torch_chunked``: the package's chunked PyTorch path (``fused_linear_topk_reverse_kl_torch``);
* ``liger_topk``: the same top-k loss as a ``LigerFusedLinearDistillationBase`` subclass (Liger's chunked
  torch.func loss; compiled with torch.compile on CUDA);
* ``liger_jsd_full``: Liger-Kernel's ``LigerFusedLinearJSD`` with beta = 1, the full-vocabulary reverse KL
  (CUDA only);
* ``triton``: the package's Triton path (``fused_linear_topk_reverse_kl_triton``, CUDA only);
* ``matmul_floor``: the four matmuls alone, chunk by chunk like the Triton path: z = h_s W_s^T, t = h_t W_t^T,
  dh_s = g W_s and dW_s += g^T h_s.

Reported per provider and shape: median, p20 and p80 of forward+backward milliseconds, peak memory above the
inputs (CUDA: ``max_memory_allocated``; CPU: peak resident set size of a fresh subprocess, the kernel's
VmHWM mark (what ``ru_maxrss`` reports) reset once the inputs exist, less the resident size at that point),
TFLOP/s of the four matmuls' 2 N V (3 H + M) flops, device and library versions. ``--out`` writes JSON, or CSV
when the name ends in ``.csv``.

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

from opcd_cli.kernels.reference import DEFAULT_CHUNK_BYTES, fused_linear_topk_reverse_kl_torch  # noqa: E402

PROVIDERS = ("eager", "torch_chunked", "liger_topk", "liger_jsd_full", "triton", "matmul_floor")
CUDA_ONLY = ("liger_jsd_full", "triton")
CPU_MEMORY_PROVIDERS = ("eager", "torch_chunked")

GPU_SHAPES = [
    dict(N=n, V=151936, H=h, M=m, k=k)
    for (h, m) in ((2048, 4096), (4096, 4096))
    for n in (1024, 4096, 16384)
    for k in (64, 256)
]
CPU_SHAPES = [dict(N=512, V=32768, H=256, M=256, k=k) for k in (64, 256)]
SMOKE_SHAPES = [dict(N=64, V=2048, H=32, M=48, k=16)]
CPU_MEMORY_SHAPES = [dict(N=4096, V=151936, H=h, M=512, k=256) for h in (256, 512)]


# ----------------------------------------------------------------------------------------------- inputs


def make_inputs(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    N, V, H, M = shape["N"], shape["V"], shape["H"], shape["M"]

    def randn(*size, scale=1.0):
        out = torch.empty(size, device=device, dtype=dtype)
        return out.normal_(0.0, scale, generator=gen)  # in place: no float32 temporary for low-precision inputs

    hs = randn(N, H).requires_grad_()
    ws = randn(V, H, scale=H**-0.5).requires_grad_()
    ht = randn(N, M)
    wt = randn(V, M, scale=M**-0.5)
    return hs, ws, ht, wt


def matmul_flops(shape: dict) -> float:
    return 2.0 * shape["N"] * shape["V"] * (3 * shape["H"] + shape["M"])


# -------------------------------------------------------------------------------------------- providers


def eager_step(hs, ws, ht, wt, k):
    z = hs @ ws.T
    with torch.no_grad():
        t = ht @ wt.T
    logp = F.log_softmax(z.float(), dim=-1)
    logq = F.log_softmax(t.float(), dim=-1)
    ids = torch.topk(z.detach(), k, dim=-1).indices
    lp, lq = logp.gather(1, ids), logq.gather(1, ids)
    loss = (lp.exp() * (lp - lq)).sum(-1).mean()
    loss.backward()


def torch_chunked_step(hs, ws, ht, wt, k):
    fused_linear_topk_reverse_kl_torch(hs, ws, ht, wt, k=k).backward()


def triton_step(hs, ws, ht, wt, k):
    from opcd_cli.kernels.fused_linear import fused_linear_topk_reverse_kl_triton

    fused_linear_topk_reverse_kl_triton(hs, ws, ht, wt, k=k).backward()


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


def make_liger_jsd_step():
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss_fn = LigerFusedLinearJSD(jsd_beta=1.0)

    def step(hs, ws, ht, wt, k):
        loss_fn(hs, ws, ht, wt, None).backward()

    return step


def matmul_floor_step(hs, ws, ht, wt, k):
    """The four matmuls in the chunks the fused paths use, with nothing in between."""
    if hs.is_cuda:  # the Triton path's chunks and float32 weight-gradient accumulation
        from opcd_cli.kernels.fused_linear import accumulate_weight_grad, chunk_rows

        rows = chunk_rows(ws.shape[0], k, hs.dtype, ht.dtype)
    else:  # the torch path's chunks; CPU inputs are float32
        rows = max(1, DEFAULT_CHUNK_BYTES // (5 * 4 * ws.shape[0]))
        accumulate_weight_grad = lambda grad, g, h: grad.addmm_(g.T, h)  # noqa: E731
    with torch.no_grad():
        grad_h = torch.empty_like(hs)
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device)
        for s in range(0, hs.shape[0], rows):
            g = hs[s : s + rows] @ ws.T
            ht[s : s + rows] @ wt.T
            torch.mm(g, ws, out=grad_h[s : s + rows])
            accumulate_weight_grad(grad_w, g, hs[s : s + rows])
        hs.grad, ws.grad = grad_h, grad_w.to(ws.dtype)


def make_step(provider: str):
    return {
        "eager": lambda: eager_step,
        "torch_chunked": lambda: torch_chunked_step,
        "liger_topk": make_liger_topk_step,
        "liger_jsd_full": make_liger_jsd_step,
        "triton": lambda: triton_step,
        "matmul_floor": lambda: matmul_floor_step,
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


def cuda_peak_mb(step, inputs, k) -> float:
    hs, ws = inputs[0], inputs[1]
    hs.grad = ws.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(*inputs, k)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


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
        except ImportError as err:
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
                row["peak_mem_mb"] = cuda_peak_mb(steps[row["provider"]], make_inputs(shape, device, dtype), shape["k"])
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


def write(path: str, info: dict, rows: list[dict]) -> None:
    if path.endswith(".csv"):
        keys = sorted({key for row in rows for key in row})
        with open(path, "w", newline="") as f:
            f.write("# " + json.dumps(info) + "\n")
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(path, "w") as f:
            json.dump({"meta": info, "results": rows}, f, indent=1)


def print_table(rows: list[dict]) -> None:
    """Times in ms; ``1 run`` is the memory subprocess's single forward+backward (CPU only)."""
    head = (
        f"{'provider':15s} {'N':>6s} {'V':>7s} {'H':>5s} {'M':>5s} {'k':>4s} {'median':>9s} {'p20':>9s} {'p80':>9s} "
        f"{'TFLOP/s':>8s} {'peak MiB':>9s} {'1 run':>9s}  status"
    )
    print(head)
    for r in rows:
        num = lambda key, fmt: format(r[key], fmt) if isinstance(r.get(key), (int, float)) else "-"  # noqa: E731
        print(
            f"{r['provider']:15s} {r['N']:6d} {r['V']:7d} {r['H']:5d} {r['M']:5d} {r['k']:4d} "
            f"{num('median_ms', '9.2f'):>9s} {num('p20_ms', '9.2f'):>9s} {num('p80_ms', '9.2f'):>9s} "
            f"{num('tflops', '8.3f'):>8s} {num('peak_mem_mb', '9.1f'):>9s} {num('single_run_ms', '9.0f'):>9s}  "
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
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of the providers")
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
    if args.cpu_memory:
        rows = cpu_memory_rows(CPU_MEMORY_SHAPES)
    else:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
        unknown = sorted(set(providers) - set(PROVIDERS))
        if unknown:
            parser.error(f"unknown providers {unknown}; choose from {PROVIDERS}")
        if args.smoke:
            shapes, reps, warmup = SMOKE_SHAPES, args.reps or 3, 1
        elif device == "cuda":
            shapes, reps, warmup = GPU_SHAPES, args.reps or 20, 2
        else:
            shapes, reps, warmup = CPU_SHAPES, args.reps or 5, 1
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        rows = []
        for shape in shapes:
            rows += bench_shape(shape, providers, device, dtype, reps, warmup)
    print_table(rows)
    if args.out:
        write(args.out, info, rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
