"""What people see: Rich progress bars, tables and messages, all on standard error.

Standard output is kept for the one JSON object that ``--json`` prints, so shell pipelines can read it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


class UI:
    def __init__(self, quiet: bool = False):
        self.console = Console(stderr=True, quiet=quiet)
        if not self.console.is_terminal:  # logs and pipes: wide enough that tables keep one line per row
            self.console.width = 160
        self._progress: Progress | None = None

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def status(self, message: str):
        """A transient spinner while something slow happens (shown on terminals only)."""
        return self.console.status(message)

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title, title_justify="left")
        for i, column in enumerate(columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

    def prompt(self, title: str, text: str, mark: str | None = None) -> None:
        """A rendered prompt as its model reads it (special tokens included), with ``mark`` (the context) set
        between ⟦ and ⟧ and highlighted."""
        start = text.find(mark) if mark else -1
        if start >= 0:
            text = f"{text[:start]}⟦{mark}⟧{text[start + len(mark):]}"
        body = Text(text)
        if start >= 0:
            body.stylize("black on yellow", start, start + len(mark) + 2)
        self.console.print(Panel(body, title=title, title_align="left", expand=False))

    @contextlib.contextmanager
    def progress(self) -> Iterator["UI"]:
        """While open, ``task`` adds bars; with no terminal, Rich prints nothing animated."""
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.console, transient=False) as progress:
            self._progress = progress
            try:
                yield self
            finally:
                self._progress = None

    def task(self, description: str, total: int) -> Callable[..., None]:
        """A new bar; the returned function advances it (``advance(n, status="loss 0.12")``)."""
        if self._progress is None:
            return lambda n=1, status=None: None
        task_id = self._progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            fields = {} if status is None else {"status": status}
            self._progress.update(task_id, advance=n, **fields)

        return advance


def print_json(obj: dict) -> None:
    """The one machine-readable object, on standard output."""
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=False) + "\n")
    sys.stdout.flush()


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
