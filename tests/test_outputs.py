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


MARKER = '{"student": "toy:small", "mode": "on-policy", "steps": 2}'  # a run's settings (some of them)


def fake_run(folder):
    """A folder that is an opcd run by its marker and its metrics."""
    folder.mkdir()
    (folder / RUN_MARKER).write_text(MARKER)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    return folder


def test_existing_run_needs_overwrite_and_is_kept_until_the_new_one_is_done(tmp_path):
    old = fake_run(tmp_path / "run")
    (old / "old.txt").write_text("old")
    with pytest.raises(OpcdError, match="--overwrite"):
        RunDir(str(old), overwrite=False)
    run = RunDir(str(old), overwrite=True)
    work = run.begin()
    assert (old / "old.txt").exists()  # still there while the new run works
    (work / RUN_MARKER).write_text(MARKER)
    run.finish()
    assert not (old / "old.txt").exists() and (old / RUN_MARKER).exists()


def test_overwrite_replaces_a_run_by_more_than_its_marker(tmp_path):
    """A folder holding a file called opcd_config.json is not thereby a run: its marker must hold a run's settings
    and a run's other files must be there; a stray `.partial` of a user's is not a stopped run either."""
    for name, files in (("empty-marker", {RUN_MARKER: "{}", "metrics.jsonl": ""}),
                        ("marker-only", {RUN_MARKER: MARKER, "thesis.tex": "precious"}),
                        ("list-marker", {RUN_MARKER: "[]", "summary.json": "{}"})):
        folder = tmp_path / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        with pytest.raises(OpcdError, match="not an opcd run"):
            RunDir(str(folder), overwrite=True)
        assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    (tmp_path / "mine.partial").mkdir()
    (tmp_path / "mine.partial" / "notes.txt").write_text("mine")
    with pytest.raises(OpcdError, match="is in the way and is not a stopped opcd run"):
        RunDir(str(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine.partial" / "notes.txt").read_text() == "mine"


def test_an_output_that_is_a_link_or_holds_or_lies_in_an_input_is_refused(tmp_path):
    from opcd_cli.outputs import check_apart

    model, data = tmp_path / "model", tmp_path / "data" / "train.jsonl"
    model.mkdir()
    data.parent.mkdir()
    data.write_text("{}\n")
    inputs = {"--student": str(model), "--data": str(data), "--teacher": "org/hub-id", "--context": "-"}
    for out, how in ((model, "is --student"), (model / "run", "lies inside --student"), (data.parent, "holds --data"),
                     (tmp_path / "model.partial", None)):
        if how is None:  # the run's .partial twin would be the student's sibling: fine
            check_apart(out, inputs)
            continue
        with pytest.raises(OpcdError, match=how):
            check_apart(out, inputs)
    with pytest.raises(OpcdError, match="--output-dir .* is --student"):
        RunDir(str(tmp_path / "model"), overwrite=True, inputs=inputs)
    (tmp_path / "link").symlink_to(model)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("link", "dangling"):
        with pytest.raises(OpcdError, match="is a symbolic link"):
            RunDir(str(tmp_path / name), overwrite=True)
    assert model.is_dir() and not (tmp_path / "nowhere").exists()


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


def test_a_folder_that_appears_during_the_run_is_never_deleted(tmp_path):
    """Without --overwrite a folder created at the output while the run goes is left alone, and so is the run."""
    run = RunDir(str(tmp_path / "late"), overwrite=False)
    work = run.begin()
    (work / RUN_MARKER).write_text("{}")
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "notes.txt").write_text("notes")
    with pytest.raises(OpcdError, match="appeared while the run was going"):
        run.finish()
    assert (tmp_path / "late" / "notes.txt").read_text() == "notes" and (work / RUN_MARKER).exists()
    run.release()


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path):
    import subprocess
    import sys

    first = RunDir(str(tmp_path / "same"), overwrite=False)
    script = ("import sys; from opcd_cli.outputs import RunDir\n"
              "from opcd_cli.errors import OpcdError\n"
              "try:\n    RunDir(sys.argv[1], overwrite=True).release()\nexcept OpcdError as e:\n    print(e)\n")
    other = subprocess.run([sys.executable, "-c", script, str(tmp_path / "same")], capture_output=True, text=True)
    assert f"another opcd run (process {__import__('os').getpid()}) is writing" in other.stdout
    first.release()
    again = subprocess.run([sys.executable, "-c", script, str(tmp_path / "same")], capture_output=True, text=True)
    assert again.stdout == ""  # free once released
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock file goes with its run


def test_the_lock_of_a_killed_run_is_free(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from opcd_cli.outputs import RunDir\n"
                               "RunDir(sys.argv[1], overwrite=False); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OpcdError, match="another opcd run"):
        RunDir(str(tmp_path / "run"), overwrite=False)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    RunDir(str(tmp_path / "run"), overwrite=False).release()  # the system released the dead process's lock


def test_written_files_get_the_usual_mode(tmp_path):
    import os

    write_text_atomic(tmp_path / "summary.json", "{}")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert os.stat(tmp_path / "summary.json").st_mode & 0o777 == os.stat(plain).st_mode & 0o777
