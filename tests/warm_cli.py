"""``python -m opcd_cli ARGS`` without paying for the imports each time: forked children of one warm interpreter.

A command line that fails on bad input spends most of its 3 s importing torch and transformers. ``WarmCLI``
starts one Python process that imports what the commands import, then forks a child for each command line: the
child takes the case's working folder, environment, standard input, output files and ``sys.argv``, and runs the
``opcd_cli`` package as ``__main__`` (as ``python -m opcd_cli`` does, ``__main__.py`` included); an exception
that escapes it is printed as the interpreter prints it, and the child's exit status is the command's. Each child
is a copy of the warm process, so no command sees another's state.

What a fresh interpreter does differently: a setting read only when a module is imported (``HF_HUB_OFFLINE``,
``TRITON_INTERPRET``) keeps the warm process's value (``PYTHONPATH`` is applied to ``sys.path`` as at start-up).
Command lines that change such settings run as real subprocesses instead (``run_fresh``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = r"""
import json, os, runpy, sys, time, traceback

import opcd_cli.cli, opcd_cli.distill, opcd_cli.evaluate, opcd_cli.extract  # what the commands import

print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            for fd, path, flags in ((0, job["stdin"], os.O_RDONLY), (1, job["stdout"], os.O_WRONLY | os.O_TRUNC),
                                    (2, job["stderr"], os.O_WRONLY | os.O_TRUNC)):
                os.dup2(os.open(path, flags), fd)
            sys.stdin, sys.stdout, sys.stderr = (open(0, closefd=False), open(1, "w", closefd=False),
                                                 open(2, "w", closefd=False))
            sys.argv = ["opcd", *job["args"]]
            sys.path[1:1] = [p for p in job["env"].get("PYTHONPATH", "").split(os.pathsep) if p]  # as at start-up
            runpy.run_module("opcd_cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline, status = start + job["timeout"], None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
        elif time.perf_counter() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.005)
    print(json.dumps({"code": status, "seconds": time.perf_counter() - start}), flush=True)
"""


class WarmCLI:
    """One warm interpreter; ``run`` is one command line at a time (use one ``WarmCLI`` per thread)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            raise RuntimeError(f"the warm interpreter did not start: {first!r}")

    def run(self, args: list[str], cwd: Path, env: dict, stdin: bytes, timeout: float) -> dict:
        """(exit code or "timeout", stdout, stderr, seconds) of ``python -m opcd_cli ARGS`` run in ``cwd``."""
        with tempfile.TemporaryDirectory() as io:
            files = {name: Path(io) / name for name in ("stdin", "stdout", "stderr")}
            files["stdin"].write_bytes(stdin)
            files["stdout"].touch()
            files["stderr"].touch()
            job = {"args": args, "cwd": str(cwd), "env": env, "timeout": timeout,
                   **{name: str(path) for name, path in files.items()}}
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            answer = json.loads(self.proc.stdout.readline())
            return {"code": answer["code"], "seconds": answer["seconds"],
                    "stdout": files["stdout"].read_bytes().decode(errors="replace"),
                    "stderr": files["stderr"].read_bytes().decode(errors="replace")}

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def run_fresh(args: list[str], cwd: Path, env: dict, stdin: bytes, timeout: float) -> dict:
    """The same command line in a new interpreter (``python -m opcd_cli ARGS``)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "opcd_cli", *args], cwd=cwd, env=env, input=stdin,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"code": "timeout", "seconds": time.perf_counter() - start, "stdout": "", "stderr": ""}
    return {"code": proc.returncode, "seconds": time.perf_counter() - start,
            "stdout": proc.stdout.decode(errors="replace"), "stderr": proc.stderr.decode(errors="replace")}
