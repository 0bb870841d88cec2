"""The embedded default: `opcd distill` with no model arguments internalises the toy system prompt."""

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_default_run_internalises_the_system_prompt(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli("distill", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["output_dir"].startswith("runs/toy-reverse-") and Path(summary["output_dir"]).is_dir()
    assert Path(summary["test_data"]).is_file() and Path(summary["context_file"]).is_file()
    # the toy base model follows the rule in context and not without it ...
    assert summary["teacher_with_context"] >= 0.90
    assert summary["student_no_context_before"] <= 0.20
    # ... and after distillation follows it without the context, keeping its in-context skills elsewhere
    assert summary["student_no_context_after"] >= summary["teacher_with_context"] - 0.10
    assert summary["ood_after"] >= summary["ood_before"] - 0.05

    code, stdout, stderr = cli("eval", "--model", summary["output_dir"], "--data", summary["test_data"], "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["accuracy"] == summary["student_no_context_after"]
