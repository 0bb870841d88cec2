"""The README's set-up commands are the ones CI runs, and they pin the CPU torch before anything pulls torch."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.startswith("python3 -m venv")]


def test_readme_has_exactly_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    install, test = commands
    assert install.endswith("opcd distill"), install
    assert test.endswith("pytest"), test
    for command in commands:
        steps = [step.strip() for step in command.split("&&")]
        torch_step = steps.index("pip install torch==2.13.0")
        first_project_install = next(i for i, step in enumerate(steps) if step.startswith("pip install -e"))
        assert torch_step < first_project_install, command


def readme_gate() -> str:
    """The benchmark gate the README's "Benchmarks in CI" shows this project's CI running."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    gates = [line.strip() for block in blocks for line in block.splitlines()
             if line.startswith("opcd bench loss") and "--baseline bench/baselines/" in line]
    assert len(gates) == 1, gates
    return gates[0]


def test_ci_runs_the_readme_test_command_and_the_benchmark_gate():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci_lines if line and not line.startswith("#")]
    test_command, gate = readme_commands()[1], readme_gate()
    assert commands.index(test_command) < commands.index(gate)  # the gate runs in the venv the tests made
    assert all(line in (test_command, gate) or line.startswith(("set ", "cd ")) for line in commands), commands
    baseline = gate.split("--baseline ")[1].split()[0]
    assert (ROOT / baseline).is_file()
