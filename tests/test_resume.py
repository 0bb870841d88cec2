"""Long runs: a killed or preempted toy run resumed with --resume ends exactly where the uninterrupted run ends."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_small_eval

STEPS = ["--steps", "6", "--save-every", "2", "--no-eval-before", "--batch-size", "8"]


def opcd(*args, cwd: Path) -> subprocess.Popen:
    """``opcd ARGS`` in a subprocess whose output goes to files (a full pipe would stall it while others run)."""
    logs = cwd / f"log-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "opcd_cli", *map(str, args)], cwd=cwd,
                            stdout=open(f"{logs}.out", "w"), stderr=open(f"{logs}.err", "w"))
    proc.logs = logs
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, Path(f"{proc.logs}.out").read_text(), Path(f"{proc.logs}.err").read_text()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {finish(proc)[2][-2000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def per_step(run: Path) -> list[tuple]:
    """What must match step for step: the loss, the top-k mass, the response tokens and the gradient norm."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["topk_mass"], r["response_tokens"], r["grad_norm"]) for r in rows]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model.safetensors")


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory) -> Path:
    """Few evaluation rows, so that the runs spend their time training."""
    return write_small_eval(tmp_path_factory.mktemp("resume"), test=12, ood=6)


@pytest.mark.slow  # three toy runs and two resumes, two at a time
def test_killed_and_preempted_runs_resume_to_the_uninterrupted_result(small_eval):
    folder = small_eval
    common = ["--eval-data", "test.jsonl", "--ood-data", "ood.jsonl", *STEPS]
    whole = opcd("distill", "-o", "whole", *common, "--json", cwd=folder)
    killed = opcd("distill", "-o", "killed", *common, cwd=folder)
    wait_for(folder / "killed.partial" / "state", killed)
    time.sleep(random.uniform(0, 1.0))  # a random moment after the first state
    killed.kill()
    finish(killed)
    assert (folder / "killed.partial").is_dir() and not (folder / "killed").exists()

    preempted = opcd("distill", "-o", "preempted", *common, cwd=folder)
    resumed_kill = opcd("distill", "--resume", "killed.partial", "--json", cwd=folder)
    wait_for(folder / "preempted.partial" / "state", preempted)
    preempted.send_signal(signal.SIGTERM)
    code, _, err = finish(preempted)
    assert code == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("opcd: stopped after step ") and "(SIGTERM)" in last, err[-2000:]
    assert last.endswith("continue with: opcd distill --resume preempted.partial") and "Traceback" not in err
    stopped_at = int(last.split("step ")[1].split()[0])
    assert 2 <= stopped_at < 6
    state = torch.load(folder / "preempted.partial" / "state" / "training_state.pt", weights_only=True)
    assert state["step"] == stopped_at  # the state of the step it stopped after, not an older one
    resumed_term = opcd("distill", "--resume", "preempted.partial", "--json", cwd=folder)

    results = {}
    for name, proc in (("whole", whole), ("killed", resumed_kill), ("preempted", resumed_term)):
        code, out, err = finish(proc)
        assert code == 0, err[-2000:]
        results[name] = json.loads(out)
    reference = per_step(folder / "whole")
    assert len(reference) == 6
    for name in ("killed", "preempted"):
        assert not (folder / f"{name}.partial").exists()
        assert per_step(folder / name) == reference, name  # every number equal, not close
        final = weights(folder / name)
        for key, value in weights(folder / "whole").items():
            assert torch.equal(final[key], value), (name, key)  # bitwise, in the saved float32
        assert results[name]["after"] == results["whole"]["after"]


@pytest.mark.slow  # one short toy run, then further steps
def test_a_finished_run_trains_further_and_refuses_changed_settings(small_eval, capsys):
    from opcd_cli.cli import main

    folder = small_eval
    run = folder / "further"
    common = ["--eval-data", str(folder / "test.jsonl"), "--ood-data", str(folder / "ood.jsonl"), "--no-eval-before",
              "-o", str(run), "--batch-size", "4", "--save-every", "1"]
    assert main(["distill", *common, "--steps", "2", "--json"]) == 0
    finished = json.loads(capsys.readouterr().out)
    config = (run / "opcd_config.json").read_text()

    # a run killed after its last step's state was saved, before its final model and summary: --resume completes it
    import shutil

    cut = folder / "cut.partial"
    shutil.copytree(run, cut)
    for name in ("model.safetensors", "summary.json", "metrics.png"):
        (cut / name).unlink()
    leftovers = [cut / ".state.k3x9a0q_", folder / ".cut.partial.z81hq2mw", cut / "checkpoints" / ".step-000003.abcdefgh"]
    for leftover in leftovers:  # what a kill in the middle of saving a state, the model or a checkpoint leaves
        (leftover / "half").mkdir(parents=True)
    (cut / ".summary.json.k2m4x8rt.tmp.json").write_text("{")
    assert main(["distill", "--resume", str(cut), "--json"]) == 0
    completed = json.loads(capsys.readouterr().out)
    assert completed["after"] == finished["after"] and per_step(folder / "cut") == per_step(run)
    assert not cut.exists() and (folder / "cut" / "model.safetensors").is_file()
    assert not any(p.exists() for p in leftovers) and not list((folder / "cut").glob(".*"))
    for key, value in weights(run).items():
        assert torch.equal(weights(folder / "cut")[key], value), key
    shutil.rmtree(folder / "cut")

    assert main(["distill", "--resume", str(run), "--steps", "2"]) == 2
    assert "has done 2 steps already; give --steps above 2" in capsys.readouterr().err
    assert main(["distill", "--resume", str(run), "--steps", "4", "--lr", "0.5", "--topk", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("these flags differ from them: --lr, --topk (only --steps, --save-every, --show-prompts, --teacher-sharding, --gradient-checkpointing, --teacher-prefix-cache, --micro-batch-tokens, --min-topk-mass and --stop-on-escape may change; --trust-remote-code, --allow-bin-weights and --report-to are given anew each time)")
    assert main(["distill", "--resume", str(run), "--overwrite"]) == 2
    assert "cannot be combined with --overwrite" in capsys.readouterr().err
    assert (run / "opcd_config.json").read_text() == config and not run.with_name("further.partial").exists()

    # the run's folder says it reported to wandb: a permission, which a folder never grants by itself
    config = json.loads((run / "opcd_config.json").read_text())
    (run / "opcd_config.json").write_text(json.dumps(config | {"report_to": "wandb"}))
    assert main(["distill", "--resume", str(run), "--steps", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert "was started with --report-to wandb; a run folder never grants a permission by itself" in " ".join(err.split())
    assert not (run / "wandb").exists() and json.loads((run / "opcd_config.json").read_text())["report_to"] == "none"
    assert [m[0] for m in per_step(run)] == [1, 2, 3]
    assert summary["steps"] == 3 and json.loads((run / "opcd_config.json").read_text())["steps"] == 3


@pytest.mark.slow  # two short toy runs
def test_a_full_disk_is_one_line_and_the_last_state_stays_resumable(small_eval, capsys, monkeypatch):
    """The disk fills while the second step's state is saved: one line that says so and how to go on, the first
    step's state intact beside it (nothing half-written), and the run resumes from it."""
    from opcd_cli.cli import main

    import opcd_cli.checkpoint as checkpoint

    folder, real, calls = small_eval, torch.save, []

    def full_at_the_second(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_at_the_second)
    run = folder / "full"
    common = ["--eval-data", str(folder / "test.jsonl"), "--no-eval-before", "--batch-size", "4", "--save-every", "1"]
    assert main(["distill", *common, "-o", str(run), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("opcd: error: the disk is full: the training state in") and "Traceback" not in err
    assert err[-1].endswith(f"free some space and continue with: opcd distill --resume {run}.partial")
    partial = run.with_name("full.partial")
    assert json.loads((partial / "state" / "step.json").read_text())["step"] == 1
    assert not [p for p in partial.iterdir() if p.name.startswith(".state.")]
    monkeypatch.setattr(checkpoint.torch, "save", real)
    assert main(["distill", "--resume", str(partial), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3 and [m[0] for m in per_step(run)] == [1, 2, 3]
