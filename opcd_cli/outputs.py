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
import shutil
import tempfile
import time
from pathlib import Path

from .errors import OpcdError

RUN_MARKER = "opcd_config.json"


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


def check_output_path(path: str, what: str = "--output-dir") -> Path:
    """A path that can become a new file or folder: not empty, not ``.`` or ``/``, in a writable folder."""
    if not str(path).strip():
        raise OpcdError(f"{what} is empty; give the name of the folder to write")
    target = Path(path).expanduser()
    resolved = target.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.cwd().resolve() or not resolved.name:
        raise OpcdError(f"{what} {path} names {'the root' if resolved == Path(resolved.anchor) else 'the current'} "
                        "folder; give a new folder name (e.g. runs/my-run)")
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

    def __init__(self, path: str, overwrite: bool, resume: bool = False):
        self.final = check_output_path(path)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.overwrite = overwrite
        self._lock = None
        if resume:
            self._check_resumable(path)
            return
        if self.final.exists():
            if not self.final.is_dir():
                raise OpcdError(f"output {path} is a file; choose another --output-dir")
            if not overwrite:
                raise OpcdError(f"output directory {path} already exists; pass --overwrite to replace it, or choose another --output-dir")
            if any(self.final.iterdir()) and not (self.final / RUN_MARKER).exists():
                raise OpcdError(f"output directory {path} is not empty and not an opcd run; refusing to replace it")
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
        to ``.partial`` until it finishes again."""
        if not self.partial.is_dir():
            if not (self.final / RUN_MARKER).is_file():
                raise OpcdError(f"{self.partial} does not exist; there is no stopped run to continue")
            self.final.rename(self.partial)
        return self.partial

    def finish(self) -> Path:
        """Put the finished run in place of an earlier run (with ``overwrite``); never replace anything else."""
        old = None
        if self.final.exists():
            replaceable = self.overwrite and (not any(self.final.iterdir()) or (self.final / RUN_MARKER).exists())
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
