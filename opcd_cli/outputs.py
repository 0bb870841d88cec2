"""Writing results without ever leaving a half-written file, losing an earlier run, or sharing a folder.

A run is written into ``<output_dir>.partial`` and renamed into place only when it has finished; a single
file is written under a temporary name and renamed. While a run is going it holds a lock on its output
(``<output_dir>.lock``, an exclusive ``flock`` the system releases if the process dies), so a second run with
the same output refuses at once instead of deleting the first one's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .errors import OpcdError
from .hub_data import is_hub_name, local_folder
from .sources import is_builtin

RUN_MARKER = "opcd_config.json"
STATE_NAME = "state"  # a run's training state (checkpoint.STATE_DIR)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what a plain open() would give: mkstemp's files are private (0600)
DIR_MODE = 0o777 & ~_umask()  # what a plain mkdir() would give: mkdtemp's folders are private (0700)


@contextlib.contextmanager
def replaced_file(path: Path):
    """Write a file whole: yields a temporary path beside ``path``, which replaces ``path`` when the block ends
    without error and is removed when it does not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with replaced_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def replaced_folder(folder: Path):
    """Write a folder whole: yields a new temporary folder beside ``folder``, which replaces ``folder`` when the
    block ends without error and is removed when it does not."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        os.chmod(tmp, DIR_MODE)
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


RUN_FILES = ("summary.json", "metrics.jsonl", "state", "data")  # what an opcd run holds beside its marker


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is an opcd run (finished or stopped) by more than one name: its marker, a JSON object
    with the run's settings, and at least one other file a run writes."""
    try:
        marker = json.loads((folder / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and {"mode", "steps", "student"} <= marker.keys()
            and any((folder / name).exists() for name in RUN_FILES))


def _is_started_run(folder: Path) -> bool:
    """A ``.partial`` folder a run made: a run, or one stopped before its first metrics (its marker only)."""
    if is_run(folder):
        return True
    try:
        marker = json.loads((folder / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and {"mode", "steps", "student"} <= marker.keys()


MODEL_FLAGS = ("--student", "--teacher", "--model")  # a name that is no local path is a hub id


def check_apart(target: Path, inputs: dict[str, str | None], what: str = "--output-dir") -> None:
    """The output (and, for a run, its ``.partial`` twin) neither is, nor holds, nor lies inside any input
    (``inputs``: flag -> path, which may not exist yet, as a ``--rollouts`` folder to be written; models named
    by hub id, built-in names and ``-`` pass)."""
    out = target.resolve()
    outputs = [out, out.with_name(out.name + ".partial")] if what == "--output-dir" else [out]
    for flag, source in inputs.items():
        if source and is_hub_name(source):
            source = local_folder(source)  # a dataset by name reads a folder only when it names one
        if not source or source == "-" or is_builtin(source):
            continue
        if flag in MODEL_FLAGS and not Path(source).expanduser().exists():
            continue  # a hub id, not a path
        src = Path(source).expanduser().resolve()
        for candidate in outputs:
            if candidate == src or candidate in src.parents or src in candidate.parents:
                how = "is" if candidate == src else ("holds" if candidate in src.parents else "lies inside")
                raise OpcdError(f"{what} {target} {how} {flag} {source}; an output never replaces or writes into "
                                "an input: choose another output")


def check_output_path(path: str, what: str = "--output-dir") -> Path:
    """A path that can become a new file or folder: not empty, not ``.`` or ``/``, not a symbolic link (a
    link's target is not what the name says), in a writable folder."""
    if not str(path).strip():
        raise OpcdError(f"{what} is empty; give the name of the folder to write")
    target = Path(path).expanduser()
    resolved = target.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.cwd().resolve() or not resolved.name:
        raise OpcdError(f"{what} {path} names {'the root' if resolved == Path(resolved.anchor) else 'the current'} "
                        "folder; give a new folder name (e.g. runs/my-run)")
    twins = [target, target.with_name(target.name + ".partial")] if what == "--output-dir" else [target]
    for name in twins:
        if name.is_symlink():
            pointed = os.readlink(name)
            state = "" if name.exists() else ", which does not exist"
            raise OpcdError(f"{what} {path}: {name} is a symbolic link to {pointed}{state}; give a real folder "
                            "name (the link's target, or a new name)")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OpcdError(f"{what} {path}: cannot write in {parent}; choose a folder you can write to")
    return target


class RunDir:
    """An output directory that appears only when the run is complete, locked while the run is going.

    The constructor checks and takes the lock (a ``.lock`` file beside the output, removed by ``release``):
    an existing directory needs ``overwrite``, and even then is replaced only if it is empty or an earlier opcd
    run; another run writing the same output is refused, naming its process.
    """

    def __init__(self, path: str, overwrite: bool, resume: bool = False, inputs: dict[str, str | None] | None = None):
        self.final = check_output_path(path)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.overwrite = overwrite
        self._lock = None
        check_apart(self.final, inputs or {})
        if resume:
            self._check_resumable(path)
            return
        if self.final.exists():
            if not self.final.is_dir():
                raise OpcdError(f"output {path} is a file; choose another --output-dir")
            if not overwrite:
                raise OpcdError(f"output directory {path} already exists; pass --overwrite to replace it, or choose another --output-dir")
            if any(self.final.iterdir()) and not is_run(self.final):
                raise OpcdError(f"output directory {path} is not empty and not an opcd run (its {RUN_MARKER} with "
                                f"the run's settings, and its {' or '.join(RUN_FILES)}); refusing to replace it")
        if self.partial.exists() and overwrite and not (self.partial.is_dir() and _is_started_run(self.partial)):
            raise OpcdError(f"{self.partial} is in the way and is not a stopped opcd run; refusing to replace it: "
                            "move it, or choose another --output-dir")
        self._take_lock()
        if self.partial.exists() and not overwrite:
            self.release()
            raise OpcdError(f"{self.partial} exists (a run that stopped early); remove it or pass --overwrite")

    def _check_resumable(self, path: str) -> None:
        """A run to continue: its ``.partial`` folder (a stopped run) or a finished run, locked."""
        if self.overwrite:
            raise OpcdError("--resume continues a run where it stopped; it cannot be combined with --overwrite")
        self._take_lock()
        if not (self.partial / RUN_MARKER).is_file() and not (self.final / RUN_MARKER).is_file():
            self.release()
            raise OpcdError(f"{path} is not a stopped or finished opcd run (neither {self.partial.name} nor "
                            f"{self.final.name} holds {RUN_MARKER})")

    @property
    def lock_file(self) -> Path:
        return self.final.with_name(self.final.name + ".lock")

    def _take_lock(self) -> None:
        self._made = [p for p in reversed(self.final.parent.absolute().parents) if not p.exists()]
        self._made += [] if self.final.parent.exists() else [self.final.parent.absolute()]
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)  # the folders made here go again on release if empty
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise OpcdError(f"cannot write the run folder {self.final}: {e.strerror or e}; choose a folder you can "
                            "write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            self._made = []
            raise OpcdError(f"another opcd run (process {holder}) is writing {self.final}; wait for it to end or "
                            "choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd

    def release(self) -> None:
        """Give the output up (the lock file goes; a finished or stopped run stays)."""
        if self._lock is not None:
            self.lock_file.unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None
            for folder in reversed(self._made):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()

    def begin(self) -> Path:
        """Start writing the run: a fresh ``.partial`` folder (an old one is only there with ``overwrite``)."""
        if self.partial.exists():
            shutil.rmtree(self.partial)
        try:
            self.partial.mkdir(parents=True)
        except OSError as e:
            raise OpcdError(f"cannot create the run folder {self.partial}: {e.strerror or e}") from None
        return self.partial

    def reopen(self) -> Path:
        """Continue writing a run: its ``.partial`` folder as it is (a stopped run), or a finished run moved back
        to ``.partial`` until it finishes again. What a kill left half-written (temporary folders and files of
        a state, a checkpoint or the final model) goes."""
        if not self.partial.is_dir():
            if not (self.final / RUN_MARKER).is_file():
                raise OpcdError(f"{self.partial} does not exist; there is no stopped run to continue")
            self.final.rename(self.partial)
        for folder, name in ((self.partial.parent, re.escape(self.partial.name)),
                             (self.partial.parent, re.escape(self.final.name)), (self.partial, STATE_NAME),
                             (self.partial / "checkpoints", r"step-\d+")):
            temporary = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}")  # mkdtemp's names: the folder's, then 8 characters
            for leftover in (folder.iterdir() if folder.is_dir() else ()):
                if temporary.fullmatch(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
        for leftover in self.partial.glob(".*.tmp*"):
            if leftover.is_file():
                leftover.unlink()  # replaced_file's
        return self.partial

    def finish(self) -> Path:
        """Put the finished run in place of an earlier run (with ``overwrite``); never replace anything else."""
        old = None
        if self.final.exists():
            replaceable = self.overwrite and self.final.is_dir() and not self.final.is_symlink() and (
                not any(self.final.iterdir()) or is_run(self.final))
            if not replaceable:
                raise OpcdError(f"{self.final} appeared while the run was going and was left alone; the finished "
                                f"run is in {self.partial}")
            old = self.final.with_name(f"{self.final.name}.old-{int(time.time())}")
            self.final.rename(old)
        self.partial.rename(self.final)
        if old is not None:
            shutil.rmtree(old)
        return self.final


class FollowerRunDir(RunDir):
    """Another process's view of rank 0's run directory (several processes under torchrun): the same paths;
    rank 0 alone checks, locks, creates and renames it."""

    def __init__(self, path: str):
        self.final = Path(path)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.overwrite, self._lock, self._made = False, None, []

    def begin(self) -> Path:
        return self.partial

    def reopen(self) -> Path:
        return self.partial

    def finish(self) -> Path:
        return self.final
