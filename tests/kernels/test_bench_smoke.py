"""The benchmark script's smoke mode runs end to end and reports every CPU provider."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_PROVIDERS = {"eager", "torch_chunked", "liger_topk", "matmul_floor"}
CUDA_PROVIDERS = {"triton", "triton_c512", "liger_jsd_full"}


@pytest.mark.slow  # several fresh Python processes: about 10 s
def test_smoke_mode_writes_every_cpu_provider(tmp_path):
    out = tmp_path / "smoke.json"
    env = {key: value for key, value in os.environ.items() if key not in ("OPCD_KERNEL", "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = "1"  # tiny shapes: threads only add contention
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_topk_kl.py"), "--smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"date", "device", "torch", "triton", "liger_kernel", "command"} <= set(report["meta"])
    rows = {row["provider"]: row for row in report["results"]}
    assert set(rows) == CPU_PROVIDERS | CUDA_PROVIDERS
    for name in CPU_PROVIDERS:
        row = rows[name]
        assert row["status"] == "ok", row
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert row["tflops"] > 0 and row["peak_mem_mb"] > 0, row
    for name in CUDA_PROVIDERS:
        assert rows[name]["status"] == "skipped" and rows[name]["reason"] == "needs CUDA"


@pytest.mark.slow  # the Triton kernels through the interpreter: about 20 s
def test_device_checks_pass_at_small_sizes():
    """The on-device correctness checks of the GPU run, dry-run on the CPU: every case runs and passes."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_topk_kl

    rows = bench_topk_kl.device_checks("cpu", small=True)
    assert len(rows) == 12
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]
