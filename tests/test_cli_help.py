"""The commands' help reads like a map: flags grouped into panels, every choice flag showing what it accepts,
and the options several commands share declared once (so their help is the same everywhere); ``opcd eval``
layers a recipe under its flags as ``distill`` and ``extract`` do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from opcd_cli.config import (
    CONTEXT_AS,
    DISTILL_MODES,
    DTYPES,
    KERNELS,
    OFF_POLICY_LOSSES,
    REPORT_TO,
    SAMPLERS,
    SCHEDULES,
    TEACHER_KINDS,
    TEACHER_SHARDING,
    TOPK_SUPPORTS,
    VERIFIERS,
)

DISTILL_PANELS = ["Models", "Data and context", "Games (instead of data)", "Loss", "Training", "Sampling", "Evaluation",
                  "Output and resume", "Scaling out", "LoRA"]
DISTILL_CHOICES = {"--mode": DISTILL_MODES, "--off-policy-loss": OFF_POLICY_LOSSES, "--topk-support": TOPK_SUPPORTS,
                   "--teacher-kind": TEACHER_KINDS, "--kernel": KERNELS, "--lr-schedule": SCHEDULES,
                   "--sampler": SAMPLERS, "--verifier": VERIFIERS, "--dtype": DTYPES, "--context-as": CONTEXT_AS,
                   "--report-to": REPORT_TO, "--teacher-sharding": TEACHER_SHARDING,
                   "--toy-task": ("codes", "shift", "recall", "game")}
SHARED = ["--dtype", "--trust-remote-code", "--allow-bin-weights", "--chat-template-kwargs", "--context-as", "--env",
          "--env-options", "--max-turns", "--verifier", "--temperature", "--top-p", "--max-new-tokens", "--seed",
          "--sampler", "--vllm-memory", "--vllm-eager", "--recipe", "--json"]


def help_text(command: str) -> str:
    env = dict(os.environ, TERMINAL_WIDTH="400", NO_COLOR="1")  # one line per flag
    done = subprocess.run([sys.executable, "-m", "opcd_cli.cli", command, "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {command: help_text(command) for command in ("distill", "extract", "eval")}


def panels(text: str) -> dict[str, list[str]]:
    """Each panel's title and the lines of its flags, in order."""
    found, current = {}, None
    for line in text.splitlines():
        if line.startswith("╭─ "):
            current = line[3:].split(" ─")[0].strip()
            found[current] = []
        elif current and line.startswith("│"):
            found[current].append(line.strip("│ "))
    return found


def flag_line(text: str, flag: str) -> str:
    lines = [line for line in text.splitlines() if line.strip("│ ").split()[:1] == [flag]]
    assert len(lines) == 1, (flag, lines)
    return " ".join(lines[0].split())


def test_distill_help_groups_the_flags_into_panels_in_the_order_a_run_meets_them(helps):
    found = panels(helps["distill"])
    assert [name for name in found if name != "Options"] == DISTILL_PANELS
    assert all(line.startswith("--help") for line in found["Options"])  # every flag of opcd's own is in a panel
    assert any(line.startswith("--topk ") for line in found["Loss"])
    assert any(line.startswith("--lora-rank ") for line in found["LoRA"])
    assert any(line.startswith("--resume ") for line in found["Output and resume"])
    assert any(line.startswith("--teacher-sharding ") for line in found["Scaling out"])


def test_every_choice_flag_shows_the_values_it_accepts(helps):
    for flag, choices in DISTILL_CHOICES.items():
        assert f"[{'|'.join(choices)}]" in flag_line(helps["distill"], flag), flag
    for command in ("extract", "eval"):
        for flag in ("--sampler", "--dtype", "--verifier", "--context-as"):
            assert f"[{'|'.join(DISTILL_CHOICES[flag])}]" in flag_line(helps[command], flag), (command, flag)


def test_a_shared_option_reads_the_same_in_every_command(helps):
    for flag in SHARED:
        lines = {flag_line(helps[command], flag) for command in ("distill", "extract", "eval")}
        assert len(lines) == 1, (flag, lines)


def test_eval_layers_a_recipe_under_its_flags(cli, tmp_path):
    recipe = tmp_path / "eval.toml"
    recipe.write_text('verifier = "exact"\ncontext = "toy:codes/context"\n[sampling]\nmax_new_tokens = 2\n')
    code, stdout, stderr = cli("eval", "--model", "toy:small", "--data", "toy:codes/test", "--limit", "3",
                               "--recipe", recipe, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["n"] == 3 and "accuracy_with_context" in result  # the recipe's context was read
    assert result["mean_response_tokens"] <= 2  # and its max_new_tokens
    code, stdout, stderr = cli("eval", "--model", "toy:small", "--data", "toy:codes/test", "--limit", "3",
                               "--recipe", recipe, "--max-new-tokens", "5", "--no-context-placeholder")
    assert code == 2 and "no-context-placeholder" in stderr  # a flag that does not exist is one line
    flags_win = cli("eval", "--model", "toy:small", "--data", "toy:codes/test", "--limit", "3", "--recipe", recipe,
                    "--max-new-tokens", "3", "--json")
    assert flags_win[0] == 0 and 2 < json.loads(flags_win[1])["mean_response_tokens"] <= 3
    (tmp_path / "bad.toml").write_text("steps = 3\n")
    code, _, stderr = cli("eval", "--model", "toy:small", "--data", "toy:codes/test", "--recipe", tmp_path / "bad.toml")
    assert code == 2 and "unknown setting 'steps'; see `opcd eval --help`" in stderr and "Traceback" not in stderr
