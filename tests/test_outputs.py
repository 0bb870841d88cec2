import pytest

from opcd_cli.errors import OpcdError
from opcd_cli.outputs import RUN_MARKER, RunDir, write_text_atomic


def test_run_appears_only_when_finished(tmp_path):
    run = RunDir(str(tmp_path / "run"), overwrite=False)
    work = run.begin()
    (work / "metrics.jsonl").write_text("{}\n")
    assert not (tmp_path / "run").exists()
    run.finish()
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not work.exists()


def test_existing_run_needs_overwrite_and_is_kept_until_the_new_one_is_done(tmp_path):
    old = tmp_path / "run"
    old.mkdir()
    (old / RUN_MARKER).write_text("{}")
    (old / "old.txt").write_text("old")
    with pytest.raises(OpcdError, match="--overwrite"):
        RunDir(str(old), overwrite=False)
    run = RunDir(str(old), overwrite=True)
    work = run.begin()
    assert (old / "old.txt").exists()  # still there while the new run works
    (work / RUN_MARKER).write_text("{}")
    run.finish()
    assert not (old / "old.txt").exists() and (old / RUN_MARKER).exists()


def test_refuses_to_replace_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(OpcdError, match="not an opcd run"):
        RunDir(str(tmp_path / "mine"), overwrite=True)


def test_leftover_partial_run_is_reported(tmp_path):
    (tmp_path / "run.partial").mkdir()
    with pytest.raises(OpcdError, match="partial"):
        RunDir(str(tmp_path / "run"), overwrite=False)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "exp.txt"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["exp.txt"]


def test_a_stopped_run_is_reopened_as_it_is(tmp_path):
    run = RunDir(str(tmp_path / "run"), overwrite=False)
    work = run.begin()
    (work / "metrics.jsonl").write_text("{}\n")
    assert run.reopen() == work and (work / "metrics.jsonl").read_text() == "{}\n"
    with pytest.raises(OpcdError, match="no stopped run"):
        RunDir(str(tmp_path / "other"), overwrite=False).reopen()
