"""``distill.state``: what a resume checks before anything moves, and a run folder saved by the code before the
configuration was grouped (``tests/fixtures/run-before-groups``) resuming with today's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opcd_cli.errors import OpcdError

FIXTURE = Path(__file__).parent.parent / "fixtures" / "run-before-groups"


def test_settings_edited_names_the_first_setting_that_differs():
    from opcd_cli.distill.state import settings_edited

    saved = {"topk": 4, "steps": 1, "report_to": "none", "sampling": {"temperature": 1.0}, "env_options": {}}
    assert settings_edited(None, saved) is None  # a state that recorded no settings
    assert settings_edited(saved, dict(saved)) is None
    assert settings_edited(saved, saved | {"steps": 9, "report_to": "wandb"}) is None  # may change on resume
    assert settings_edited(saved, saved | {"topk": 8}) == ("topk", 4, 8)
    assert settings_edited(saved, saved | {"sampling": {"temperature": 0.5}}) == ("temperature", 1.0, 0.5)
    assert settings_edited(saved, saved | {"env_options": {"size": 5}}) == ("env_options", {}, {"size": 5})
    assert settings_edited(saved, saved | {"new_setting": 1}) is None  # a setting added since is at its default


def test_check_resumable_wants_steps_beyond_the_saved_state(tmp_path):
    from opcd_cli.distill.state import check_resumable

    class Out:
        final, partial = tmp_path / "run", tmp_path / "run.partial"

    shutil.copytree(FIXTURE / "run", Out.final)
    check_resumable(Out, 2)  # the finished run did 1 step
    with pytest.raises(OpcdError, match=r"has done 1 steps already; give --steps above 1 to train it further"):
        check_resumable(Out, 1)
    Out.final.rename(Out.partial)  # stopped after its last step's state was saved: --steps 1 completes it
    check_resumable(Out, 1)


def test_a_run_saved_before_the_config_was_grouped_resumes(cli, tmp_path, monkeypatch):
    """The fixture's run (LoRA rank 1, one step, saved by the code of commit 61b97da) continues to step 2 with
    today's code: its flat opcd_config.json read, its state restored, its recorded inputs matched."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")  # the run names its eval data by a relative path
    first = (Path("run") / "metrics.jsonl").read_text().splitlines()
    code, stdout, stderr = cli("distill", "--resume", "run", "--steps", "2", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["steps"] == 2 and summary["lora"] == {"rank": 1, "alpha": 2, "targets": "all-linear", "merged": False}
    metrics = (Path("run") / "metrics.jsonl").read_text().splitlines()
    assert metrics[:1] == first and json.loads(metrics[1])["step"] == 2
    assert (Path("run") / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((Path("run") / "opcd_config.json").read_text())
    assert config["steps"] == 2 and config["lora_rank"] == 1 and config["sampling"]["max_new_tokens"] == 4
    assert summary["after"] is not None and summary["before"] is None  # evaluated after; --no-eval-before kept
