"""The CLI's Reporter: rich progress bars on a terminal, plain lines (one every few seconds) in batch logs."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from pipeline.engine import Advance

console = Console(stderr=True)


class CliReporter:
    def info(self, message: str) -> None:
        console.print(message, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Advance]:
        if console.is_terminal:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("•"),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            with Progress(*columns, console=console, transient=False) as bar:
                task = bar.add_task(description, total=total)

                def advance_bar(n: int = 1, note: str | None = None) -> None:
                    bar.update(task, advance=n, description=f"{description} {note}" if note else description)

                yield advance_bar
            return
        done, last = 0, time.monotonic()

        def advance(n: int = 1, note: str | None = None) -> None:
            nonlocal done, last
            done += n
            if time.monotonic() - last > 5 or done == total:
                last = time.monotonic()
                print(f"{description}: {done}/{total}{' ' + note if note else ''}", file=sys.stderr, flush=True)

        yield advance
