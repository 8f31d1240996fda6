"""One module per DAG stage: each declares its name, `VERSION`, params and inputs, and calls `pipeline/`.

Stages report through a `Reporter` (the CLI's rich progress, or `QuietReporter` in tests and batch jobs) and never
print themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Reporter(Protocol):
    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def progress(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        """A context whose value is `advance(n=1, note=None)`; `note` is a short status (loss, images/s)."""
        ...


class QuietReporter:
    """Collects messages instead of printing them."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def info(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.messages.append("warning: " + message)

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n=1, note=None: None


def task_slice(n_units: int, task_index: int | None, num_tasks: int | None) -> range:
    """Units owned by array task i of T: [⌊iU/T⌋, ⌊(i+1)U/T⌋); all units without task flags."""
    if task_index is None and num_tasks is None:
        return range(n_units)
    from pipeline.errors import PipeError

    if task_index is None or num_tasks is None:
        raise PipeError("--task-index needs --num-tasks (and vice versa); SLURM_ARRAY_TASK_COUNT is not trusted "
                        "because it is 1 when a single failed index is resubmitted")
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise PipeError(f"--task-index must be in 0..{num_tasks - 1} for --num-tasks {num_tasks}, got {task_index}")
    return range(task_index * n_units // num_tasks, (task_index + 1) * n_units // num_tasks)
