"""``--teacher-kind``: the frozen teacher (the default), a moving average of the student (``ema``), and the student
itself (``live``); on tiny models."""

import json

import torch

from opcd_cli import teachers
from opcd_cli.forward import TeacherPrefix

from test_distill_cli import distill_args, with_flags


def per_step(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ema_update_is_the_moving_average():
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    teachers.ema_update(teacher, student, 0.9)
    for got, want in zip(teacher.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)


def test_a_moving_teacher_forgets_its_cached_prefix_and_a_frozen_one_keeps_it():
    teacher, student = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for kind, kept in (("frozen", True), ("live", False), ("ema", False)):
        prefix = TeacherPrefix([1, 2, 3])
        prefix._kv = ["cached"]
        teachers.after_step(kind, teacher, student, 0.5, prefix)
        assert (prefix._kv == ["cached"]) is kept, kind


def test_every_kind_starts_at_the_students_weights_and_only_the_moving_ones_move(cli, tiny_student, toy_files,
                                                                                 tmp_path):
    """Step 1: every teacher is the student's initial weights, so the three runs' first steps are the same.
    Step 2: the frozen teacher is where it was, the live one is the updated student, the average is between:
    three different losses."""
    runs = {}
    for kind in ("frozen", "ema", "live"):
        out = tmp_path / kind
        decay = ["--ema-decay", "0.5"] if kind == "ema" else []
        args = with_flags(distill_args(tiny_student, toy_files, out, "--teacher-kind", kind, *decay,
                                       "--no-eval-before", "--json"), {"--steps": "2"})
        code, stdout, err = cli(*args)
        assert code == 0, err
        summary = json.loads(stdout)
        assert summary["teacher_kind"] == kind
        runs[kind] = per_step(out)
    first = {kind: rows[0] for kind, rows in runs.items()}
    for kind in ("ema", "live"):
        assert abs(first[kind]["loss"] - first["frozen"]["loss"]) < 1e-6, kind
    second = [rows[1]["loss"] for rows in runs.values()]
    assert len({round(x, 7) for x in second}) == 3, second


def test_an_ema_run_resumes_to_the_uninterrupted_result(cli, tiny_student, toy_files, tmp_path):
    """The average is part of the training state: 2 steps, then 1 more with --resume, ends as 3 steps do."""
    base = distill_args(tiny_student, toy_files, tmp_path / "whole", "--teacher-kind", "ema", "--ema-decay", "0.5",
                        "--no-eval-before", "--save-every", "1")
    code, _, err = cli(*with_flags(base, {"--steps": "3"}))
    assert code == 0, err
    code, _, err = cli(*with_flags(base, {"--steps": "2", "-o": str(tmp_path / "parts")}))
    assert code == 0, err
    code, _, err = cli("distill", "--resume", tmp_path / "parts", "--steps", "3")
    assert code == 0, err
    whole, parts = per_step(tmp_path / "whole"), per_step(tmp_path / "parts")
    assert [r["step"] for r in parts] == [1, 2, 3]
    for a, b in zip(whole, parts):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5, a["step"]
