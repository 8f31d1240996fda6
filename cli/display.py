"""What the CLI shows: its Reporter (rich progress bars on a terminal, plain lines, one every few seconds, in batch
logs), the runs table of `status` and the out-of-memory line."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from pipeline.engine import Advance
    from pipeline.records import Prediction


def output_closed() -> None:
    """The reader of our output went away (`train … | head`): from here on every line goes nowhere, the interpreter's
    flush at exit included, and the work goes on (a run's metrics.jsonl and events.jsonl keep its record)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich's own answer is SystemExit(1), which would end a training run because `| head` stopped reading."""
        self.quiet = True
        output_closed()


console = _Console(stderr=True)


class CliReporter:
    def info(self, message: str) -> None:
        self._say(message)

    def warn(self, message: str) -> None:
        self._say(f"[yellow]warning:[/] {message}")

    @staticmethod
    def _say(line: str) -> None:
        try:
            console.print(line, highlight=False, soft_wrap=True)
        except BrokenPipeError:
            output_closed()

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
                try:
                    print(f"{description}: {done}/{total}{' ' + note if note else ''}", file=sys.stderr, flush=True)
                except BrokenPipeError:
                    output_closed()

        yield advance



def print_status(work: Path) -> None:
    """The stages table (one row per stage folder) and the runs table."""
    from rich.table import Table

    from pipeline.errors import PipeError

    if work.exists() and not work.is_dir():
        raise PipeError(f"{work}: expected a work folder (make's WORK), found a file")
    if not work.exists():  # before the first stage, or a mistyped WORK: the table alone would not tell them apart
        print(f"warning: {work} does not exist yet: nothing has run there (is WORK right?)", file=sys.stderr)

    from pipeline.status import stage_rows
    from stages import versions

    table = Table(title=f"alexnet-pipe status: {work}")
    for col in ("stage", "folder", "state", "detail"):
        table.add_column(col)
    colours = {"done": "green", "stale": "yellow", "partial": "cyan", "missing": "red", "damaged": "magenta",
               "diverged": "red"}
    for name, folder, state in stage_rows(work, versions()):
        table.add_row(name, str(folder), f"[{colours[state.state]}]{state.state}[/]", state.detail)
    out = _Console(width=None if sys.stdout.isatty() else 160)
    out.print(table)
    print_runs(out, work)
    print_boards(out, work)


def print_boards(console, work: Path) -> None:
    """Where the TensorBoard events are and how to see them."""
    from pipeline.board import board_folders

    folders = [str(f) for f in board_folders(work)]
    if folders:
        shown = ", ".join(folders[:4]) + (f" and {len(folders) - 4} more" if len(folders) > 4 else "")
        console.print(f"TensorBoard events in {work}: {shown}. See them: make tensorboard WORK={work} (or "
                      f"tensorboard --logdir {work})", soft_wrap=True)


def print_runs(console, work: Path) -> None:
    """The training runs' progress: step reached, epochs done, last val error, rate and time left while running."""
    from rich import box
    from rich.table import Table

    from pipeline.status import run_progress

    rows = run_progress(work)
    if not rows:
        return
    table = Table(title="runs", box=box.SIMPLE_HEAD)  # no │: scripts that read the stage table's rows still can
    for col in ("run", "state", "step", "epochs done", "val top-1 error", "rate", "time left"):
        table.add_column(col)
    for r in rows:
        step = f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step)
        error = f"{r.val_top1_error:.4f}" if r.val_top1_error is not None else "—"
        rate = f"{r.steps_per_s:g} steps/s, {r.images_per_s:g} img/s" if r.steps_per_s else "—"
        left = f"{r.eta_s // 3600}h{r.eta_s % 3600 // 60:02d}m{r.eta_s % 60:02d}s" if r.eta_s is not None else "—"
        table.add_row(r.run, r.state, step, str(r.epochs_done), error, rate, left)
    console.print(table)


OUT_OF_MEMORY = ("out of memory: lower --batch-size (or --eval-batch-size, --width), --loader-threads or --workers; "
                 "on a GPU, --amp halves the activations")


def is_out_of_memory(e: BaseException) -> bool:
    """torch's allocators raise RuntimeError (CPU: "DefaultCPUAllocator: can't allocate memory", C++'s
    std::bad_alloc) or torch.OutOfMemoryError (CUDA); DALI raises RuntimeError with bad_alloc or out of memory; the
    loader raises ImportError when a library's segments cannot be mapped (an address-space limit, `ulimit -v`)."""
    text = str(e)
    return type(e).__name__ == "OutOfMemoryError" or any(
        s in text for s in ("can't allocate memory", "std::bad_alloc", "out of memory", "CUDA out of memory",
                            "failed to map segment", "cannot allocate memory"))


def one_line(e: BaseException) -> tuple[int, str | None]:
    """An error as the exit code and the one line it is told in (None: nothing to say on this rank)."""
    from pipeline.cluster import placement
    from pipeline.errors import Diverged, PipeError, Stopped

    if isinstance(e, Stopped | Diverged):  # the run ended at a checkpoint (rank 0 says why; every rank exits alike)
        said = f"error: {e}" if isinstance(e, Diverged) else str(e)
        return e.exit_code, said if placement().rank == 0 else None
    if isinstance(e, PipeError):
        flag = f"--{e.option.replace('_', '-')}: " if e.option else ""
        return e.exit_code, f"error: {flag}{e}"
    if isinstance(e, PermissionError):  # a folder or file of the user's that this user may not read or write
        return 2, (f"error: {e.filename or ''}: permission denied (expected a path this user may read, and write for "
                   "outputs; check its mode and owner)")
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:  # a path the user typed, anywhere it is used
        path = Path(str(e.filename or ""))
        folder = next((p for p in path.parents if p.is_dir()), Path("."))
        return 2, (f"error: {path}: expected a file name of at most {os.pathconf(folder, 'PC_NAME_MAX')} bytes (this "
                   f"file system's limit), found {len(path.name.encode())}; choose a shorter name")
    if isinstance(e, MemoryError):
        return 2, f"error: {OUT_OF_MEMORY}"
    if is_out_of_memory(e):
        wanted = re.search(r"allocate (\d+) bytes", str(e))
        said = f"{int(wanted.group(1)):,} bytes more were asked for" if wanted else str(e).splitlines()[0][:160]
        return 2, f"error: {OUT_OF_MEMORY} ({said})"
    return 1, f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)"


def print_prediction(record: Prediction, json_lines: bool) -> None:
    """One image's record from `predict`: a JSON line, or its path and top-k lines (an unreadable file was warned
    about already)."""
    if json_lines:
        print(json.dumps(record.to_json()), flush=True)
    elif record.top is not None:
        print(record.path)
        for rank, c in enumerate(record.top, 1):
            print(f"  {rank}. {c.probability:.4f}  {c.wnid}  {c.name}")
