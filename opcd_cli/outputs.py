"""Writing results without ever leaving a half-written file or losing an earlier run.

A run is written into ``<output_dir>.partial`` and renamed into place only when it has finished; a single
file is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import OpcdError

RUN_MARKER = "opcd_config.json"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class RunDir:
    """An output directory that appears only when the run is complete.

    The constructor only checks (nothing is written): an existing directory needs ``overwrite``, and even
    then is replaced only if it is empty or an earlier opcd run.
    """

    def __init__(self, path: str, overwrite: bool):
        self.final = Path(path)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.overwrite = overwrite
        if self.final.exists():
            if not self.final.is_dir():
                raise OpcdError(f"output {path} is a file; choose another --output-dir")
            if not overwrite:
                raise OpcdError(f"output directory {path} already exists; pass --overwrite to replace it, or choose another --output-dir")
            if any(self.final.iterdir()) and not (self.final / RUN_MARKER).exists():
                raise OpcdError(f"output directory {path} is not empty and not an opcd run; refusing to replace it")
        if self.partial.exists() and not overwrite:
            raise OpcdError(f"{self.partial} exists (a run in progress, or one that stopped early); remove it or pass --overwrite")

    def begin(self) -> Path:
        """Start writing the run: a fresh ``.partial`` folder (an old one is only there with ``overwrite``)."""
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        return self.partial

    def reopen(self) -> Path:
        """Continue writing a run that stopped early: its ``.partial`` folder as it is."""
        if not self.partial.is_dir():
            raise OpcdError(f"{self.partial} does not exist; there is no stopped run to continue")
        return self.partial

    def finish(self) -> Path:
        """Put the finished run in place of any earlier one."""
        old = None
        if self.final.exists():
            old = self.final.with_name(f"{self.final.name}.old-{int(time.time())}")
            self.final.rename(old)
        self.partial.rename(self.final)
        if old is not None:
            shutil.rmtree(old)
        return self.final
