"""`opcd distill` through the CLI on tiny models: outputs, reloading, and every kind of bad input."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tree, write_jsonl

FAST = ["--steps", "2", "--batch-size", "2", "--topk", "8", "--lr", "1e-3", "--max-new-tokens", "4",
        "--eval-max-new-tokens", "4"]


def distill_args(student, files, out, *extra):
    return ["distill", "--student", student, "--data", files["train"], "--context", files["context"],
            "--eval-data", files["test"], "--ood-data", files["ood"], "-o", out, *FAST, *extra]


def test_cross_size_distill_writes_a_complete_run(cli, tiny_student, tiny_teacher, toy_files, tmp_path, monkeypatch):
    import opcd_cli.distill.state as distill_module

    probe = torch.tensor([[1, 20, 21, 22]])
    at_save = {}
    real_save = distill_module.save_model

    def spy(student, tokenizer, folder, cfg):
        with torch.no_grad():
            at_save[Path(folder).name] = student(input_ids=probe).logits.clone()
        real_save(student, tokenizer, folder, cfg)

    monkeypatch.setattr(distill_module, "save_model", spy)
    out = tmp_path / "run"
    code, stdout, stderr = cli(*distill_args(tiny_student, toy_files, out, "--teacher", tiny_teacher, "--json"))
    assert code == 0, stderr
    summary = json.loads(stdout)  # exactly one JSON object on stdout
    assert summary["output_dir"] == str(out) and summary["steps"] == 2 and summary["kernel"] == "fused-linear"
    for when, key in (("before", "accuracy"), ("after", "accuracy"), ("before", "teacher_accuracy_with_context"),
                      ("before", "ood_accuracy"), ("after", "ood_accuracy")):
        assert 0.0 <= summary[when][key] <= 1.0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "metrics.jsonl",
                 "opcd_config.json", "summary.json"):
        assert (out / name).is_file(), name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert set(metrics[0]) >= {"loss", "topk_mass", "response_tokens", "lr", "tokens_per_s", "seconds"}
    for m in metrics:  # what shows a collapse: both entropies at the response tokens, the share of distinct tokens
        assert 0 < m["student_entropy"] < math.log(512) and 0 < m["teacher_entropy"] < math.log(512)
        assert 0 < m["distinct_tokens"] <= 1
    for m in metrics:  # where each step's time went: every phase ran, and together they fit in the step
        phases = m["seconds_by_phase"]
        assert all(phases[name] > 0 for name in ("rollouts", "teacher_forward", "student_forward", "backward",
                                                  "optimizer")), phases
        assert sum(phases.values()) <= m["step_seconds"] + 1e-3
    timing = summary["time_by_phase"]
    assert timing["shares"]["teacher_forward"] > 0 and abs(sum(timing["shares"].values()) - 1) < 0.01
    assert "time per step" in stderr and "teacher forward" in stderr
    assert json.loads((out / "opcd_config.json").read_text())["teacher"] == str(tiny_teacher)

    # plain transformers loads the saved student and computes the logits it had at the end of training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, at_save["run.partial"], rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_training_changes_the_student_and_eval_reproduces_the_run(cli, tiny_student, toy_files, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = cli(*distill_args(tiny_student, toy_files, out, "--json"))
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert "frozen copy" in summary["teacher"]
    from safetensors.torch import load_file

    before, after = load_file(tiny_student / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    code, stdout, stderr = cli("eval", "--model", out, "--data", summary["inputs"]["test"], "--max-new-tokens", "4",
                               "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["n"] == 6
    assert result["accuracy"] == summary["after"]["accuracy"]
    assert result["mean_response_tokens"] == summary["after"]["mean_response_tokens"]


def test_context_from_stdin(cli, tiny_student, toy_files, tmp_path, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(toy_files["context"].read_text()))
    args = distill_args(tiny_student, toy_files, tmp_path / "run", "--json")
    args[args.index("--context") + 1] = "-"
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    assert json.loads(stdout)["context_file"] == "-"


def test_existing_run_is_not_overwritten_without_the_flag(cli, tiny_student, toy_files, tmp_path):
    out = tmp_path / "run"
    assert cli(*distill_args(tiny_student, toy_files, out))[0] == 0
    before = tree(out)
    code, _, err = cli(*distill_args(tiny_student, toy_files, out))
    assert code == 2 and "--overwrite" in err and tree(out) == before
    code, _, err = cli(*distill_args(tiny_student, toy_files, out, "--overwrite", "--steps", "1"))
    assert code == 0, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def _bad_inputs(tmp_path: Path, toy_files, tiny_student):
    """(name, how to change the arguments, expected message) for each kind of bad input."""
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a"}])
    broken.write_text(broken.read_text() + '{"prompt": "b"\n')
    no_prompt = write_jsonl(tmp_path / "no_prompt.jsonl", [{"text": "a"}])  # a column no format reads as a prompt
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    empty_context = tmp_path / "empty.txt"
    empty_context.write_text("\n")
    other_vocab = tmp_path / "other-vocab"
    from conftest import make_tiny_model
    from transformers import AutoTokenizer

    make_tiny_model(other_vocab)
    tok = AutoTokenizer.from_pretrained(other_vocab)
    tok.add_tokens(["<|tool|>"])
    tok.save_pretrained(other_vocab)
    return [
        ("missing data", {"--data": tmp_path / "nope.jsonl"}, "does not exist"),
        ("empty data", {"--data": empty}, "is empty"),
        ("unreadable data", {"--data": binary}, "not UTF-8"),
        ("broken line", {"--data": broken}, "line 2 is not valid JSON"),
        ("no prompt field", {"--data": no_prompt}, "line 1 has no `prompt` or `messages` field"),
        ("missing context", {"--context": tmp_path / "none.txt"}, "context file .* does not exist"),
        ("empty context", {"--context": empty_context}, "is empty"),
        ("unknown model", {"--student": tmp_path / "no-model"}, "does not exist"),
        ("other vocabulary", {"--teacher": other_vocab}, "vocabularies .* differ in 1 tokens"),
        ("k of 0", {"--topk": 0}, "topk must be at least 1"),
        ("k above vocab", {"--topk": 113}, "larger than the vocabulary \\(112 tokens\\)"),
        ("negative lr", {"--lr": -1e-5}, "lr must be positive"),
        ("zero steps", {"--steps": 0}, "steps must be"),
        ("not a number", {"--steps": "ten"}, "Invalid value for '--steps'"),
        ("bad eval data", {"--eval-data": no_prompt}, "no `prompt` or `messages`"),
    ]


def with_flags(args: list, change: dict) -> list:
    args = list(args)
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def test_bad_input_gets_one_line_exit_2_and_writes_nothing(cli, tiny_student, toy_files, tmp_path):
    import re

    (tmp_path / "bad").mkdir()
    for name, change, message in _bad_inputs(tmp_path / "bad", toy_files, tiny_student):
        out = tmp_path / f"run-{name.replace(' ', '-')}"
        args = with_flags(distill_args(tiny_student, toy_files, out), change)
        before = tree(tmp_path)
        code, stdout, stderr = cli(*args)
        assert code == 2, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("opcd: error:"), (name, stderr)
        assert re.search(message, lines[0]), (name, lines[0])
        assert "Traceback" not in stderr and stdout == ""
        assert tree(tmp_path) == before, name  # nothing written, nothing changed


def test_off_policy_rollouts_are_saved_reused_and_checked(cli, tiny_student, toy_files, tmp_path):
    rollouts = tmp_path / "rollouts"
    code, out, err = cli(*distill_args(tiny_student, toy_files, tmp_path / "a", "--mode", "off-policy",
                                       "--rollouts", rollouts, "--json"))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["mode"] == "off-policy" and summary["rollouts"] == "teacher"
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    # off-policy the student's entropy is measured, the teacher's is not (only its saved top-k are known)
    assert all(m["student_entropy"] > 0 and m["teacher_entropy"] is None and m["distinct_tokens"] > 0 for m in metrics)
    meta = json.loads((rollouts / "rollouts.json").read_text())
    assert meta["examples"] == 8 and meta["topk"] == 8
    from safetensors.torch import load_file

    saved = load_file(rollouts / "rollouts.safetensors")
    assert saved["topk_ids"].shape == saved["topk_logprobs"].shape == (int(saved["lengths"].sum()), 8)
    assert (saved["topk_logprobs"] <= 0).all()  # full-vocabulary log-probabilities

    stamp = tree(rollouts)
    code, out, err = cli(*distill_args(tiny_student, toy_files, tmp_path / "b", "--mode", "off-policy",
                                       "--rollouts", rollouts, "--off-policy-loss", "sft", "--json"))
    assert code == 0, err
    assert tree(rollouts) == stamp  # reused, not regenerated

    before = tree(tmp_path)
    code, out, err = cli(*distill_args(tiny_student, toy_files, tmp_path / "c", "--mode", "off-policy",
                                       "--rollouts", rollouts, "--topk", "4"))
    assert code == 2 and "made from other inputs (they differ in topk)" in err
    assert tree(tmp_path) == before


def test_off_policy_from_a_teacher_with_more_output_rows(cli, tiny_student, tiny_teacher, toy_files, tmp_path):
    """The larger teacher pads its output layer to 128 rows, the student to 112: the teacher's saved top-k must
    lie within the rows they share, or the student's loss would index past its own."""
    rollouts = tmp_path / "rollouts"
    code, out, err = cli(*distill_args(tiny_student, toy_files, tmp_path / "run", "--mode", "off-policy",
                                       "--teacher", tiny_teacher, "--rollouts", rollouts, "--topk", "64"))
    assert code == 0, err
    from safetensors.torch import load_file

    saved = load_file(rollouts / "rollouts.safetensors")
    ids = saved["topk_ids"]
    assert ids.shape[1] == 64 and int(ids.max()) < 112 and int(ids.max()) > 64
    assert int(saved["response_ids"].max()) < 112

    # rollouts that do hold such ids (as made before the teacher was held to the shared rows) are refused
    from safetensors.torch import save_file

    saved["topk_ids"][0, 0] = 120
    save_file(saved, str(rollouts / "rollouts.safetensors"))
    before = tree(tmp_path)
    code, out, err = cli(*distill_args(tiny_student, toy_files, tmp_path / "again", "--mode", "off-policy",
                                       "--teacher", tiny_teacher, "--rollouts", rollouts, "--topk", "64"))
    assert code == 2 and "hold token id 120, past the student's 112 output rows" in err
    assert len(err.strip().splitlines()) == 1 and tree(tmp_path) == before


def test_consistency_regulariser_is_logged(cli, tiny_student, toy_files, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli(*distill_args(tiny_student, toy_files, out, "--consistency-weight", "0.5", "--json"))
    assert code == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["consistency_loss"] != 0 and m["anchor_loss"] == 0 for m in metrics)
    assert all(abs(m["loss"] - m["distill_loss"] - m["consistency_loss"]) < 1e-5 for m in metrics)
    summary = json.loads(stdout)
    assert summary["consistency_weight"] == 0.5 and 0 <= summary["after"]["context_harm"] <= 1


def test_consistency_schedule_holds_the_term_back(cli, tiny_student, toy_files, tmp_path, monkeypatch):
    import opcd_cli.loss as loss_module

    context_given = []  # per micro-batch: whether the student's pass with the context was asked for
    real = loss_module.DistillLoss.on_policy

    def spy(self, student_in, teacher_in, context_in=None, *args):
        context_given.append(context_in is not None)
        return real(self, student_in, teacher_in, context_in, *args)

    monkeypatch.setattr(loss_module.DistillLoss, "on_policy", spy)
    out = tmp_path / "run"
    code, stdout, err = cli(*distill_args(tiny_student, toy_files, out, "--steps", "4", "--consistency-weight", "0.5",
                                          "--consistency-start", "2", "--consistency-warmup", "2", "--json"))
    assert code == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["consistency_weight"] for m in metrics] == [0, 0.25, 0.5, 0.5]
    assert metrics[0]["consistency_loss"] == 0 and all(m["consistency_loss"] != 0 for m in metrics[1:])
    assert context_given == [False, True, True, True]  # no extra student pass before the term starts
    assert json.loads(stdout)["consistency_start"] == 2 and json.loads(stdout)["consistency_warmup"] == 2


def test_union_support_trains_and_is_recorded(cli, tiny_student, toy_files, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli(*distill_args(tiny_student, toy_files, out, "--topk-support", "union", "--json"))
    assert code == 0, err
    assert json.loads(stdout)["topk_support"] == "union"
    assert json.loads((out / "opcd_config.json").read_text())["topk_support"] == "union"


def test_in_context_anchor_is_logged(cli, tiny_student, toy_files, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli(*distill_args(tiny_student, toy_files, out, "--anchor-weight", "2", "--json"))
    assert code == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the teacher is the student's initial weights: the same with the context at step 1, apart after it
    assert metrics[0]["anchor_loss"] == 0 and metrics[1]["anchor_loss"] != 0  # (a top-k KL may be below 0)
    assert all(m["consistency_loss"] == 0 for m in metrics)
    assert all(abs(m["loss"] - m["distill_loss"] - m["anchor_loss"]) < 1e-5 for m in metrics)
    assert json.loads(stdout)["anchor_weight"] == 2.0


def test_eval_several_models_best_checkpoints_and_ood(cli, tiny_student, toy_files, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(*with_flags(distill_args(tiny_student, toy_files, out), {"--steps": "4", "--save-every": "1"}))
    assert code == 0, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002", "step-000003"]
    code, stdout, err = cli("eval", "--model", out, "--model", tiny_student, "--data", toy_files["test"],
                            "--context", toy_files["context"], "--ood-data", toy_files["ood"], "--best", "3",
                            "--max-new-tokens", "4", "--json")
    assert code == 0, err
    run_row, base_row = json.loads(stdout)["results"]
    assert len(run_row["checkpoints"]) == 3
    for row in (run_row, base_row):
        assert {"accuracy", "accuracy_with_context", "context_harm", "ood_accuracy", "mean_response_tokens",
                "mean_response_tokens_with_context"} <= set(row)
    assert "with context" in err and "OOD" in err and "context harm" in err  # the table's columns


def test_a_diverging_run_stops_before_the_broken_step(cli, tiny_student, toy_files, tmp_path, monkeypatch):
    """A non-finite loss stops the run at that step, before any update: one line naming the step, exit 2, the
    metrics and checkpoints so far kept in the .partial folder, the weights there still finite."""
    from opcd_cli.loss import DistillLoss

    real = DistillLoss.on_policy
    calls = []

    def on_policy(self, *args):
        parts = real(self, *args)
        calls.append(1)
        if len(calls) > 1:  # from the second step on
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(DistillLoss, "on_policy", on_policy)
    out = tmp_path / "run"
    code, stdout, stderr = cli(*with_flags(distill_args(tiny_student, toy_files, out), {"--steps": "3",
                                                                                        "--save-every": "1"}))
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("opcd: error: step 2: the loss is nan") and "training diverged" in lines[-1]
    partial = tmp_path / "run.partial"
    assert not out.exists() and partial.is_dir() and str(partial) in lines[-1]
    assert len((partial / "metrics.jsonl").read_text().splitlines()) == 1
    from safetensors.torch import load_file

    saved = load_file(partial / "checkpoints" / "step-000001" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    state = torch.load(partial / "state" / "training_state.pt", weights_only=True)
    assert state["step"] == 1  # the run can be resumed from the last good step


def interrupt(args: list, cwd: Path, when: Path, signal_number) -> tuple[int, str]:
    """Start ``opcd ARGS`` in a subprocess, send it a signal as soon as ``when`` exists; (exit code, stderr)."""
    import subprocess
    import sys
    import time

    import signal

    def as_in_a_terminal():  # a shell's background job (CI may be one) starts its children ignoring SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "opcd_cli", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal)
    deadline = time.time() + 120
    while not when.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal_number)
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr[-2000:]
    return proc.returncode, stderr.strip().splitlines()[-1]


@pytest.mark.slow  # four short runs, interrupted
def test_signals_stop_a_run_cleanly(tiny_student, toy_files, tmp_path):
    """Outside the loop (here: the toy run's evaluation before training), Ctrl-C and SIGTERM stop at once (exit
    130 and 143) and say where the partial run is; in the loop, they stop after the current step with the state
    saved and say how to resume."""
    import signal

    for number, code, word in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")):
        name = f"toy-{word}"
        got, last = interrupt(["distill", "-o", name], tmp_path, tmp_path / f"{name}.partial" / "opcd_config.json",
                              number)
        assert (got, last) == (code, f"opcd: {word}; the partial run is in {name}.partial"), last
        assert not (tmp_path / f"{name}.lock").exists()
    args = with_flags(distill_args(tiny_student, toy_files, "run"), {"--steps": "400"})
    for number, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        got, last = interrupt(args, tmp_path, tmp_path / "run.partial" / "metrics.jsonl", number)
        assert got == code and last.startswith("opcd: stopped after step "), last
        assert f" of 400 ({number.name}); continue with: opcd distill --resume run.partial" in last, last
        step = int(last.split("step ")[1].split()[0])
        state = torch.load(tmp_path / "run.partial" / "state" / "training_state.pt", weights_only=True)
        assert state["step"] == step == len((tmp_path / "run.partial" / "metrics.jsonl").read_text().splitlines())
        import shutil

        shutil.rmtree(tmp_path / "run.partial")
