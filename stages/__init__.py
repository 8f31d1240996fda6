"""One module per DAG stage: each declares its name, `VERSION`, params and inputs, and calls `pipeline/`. Stages
never import each other: the CLI composes them (a sweep is handed the train and eval stages it runs).

Stages report through a `Reporter` (the CLI's rich progress, or `QuietReporter` in tests and batch jobs) and never
print themselves; each returns a `StageResult`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.cache import MARKER, Stage


@dataclass(frozen=True)
class StageResult:
    """What every stage returns: where its output is, whether it was found up to date (nothing done), whether this
    call finished it (wrote its done marker: an array task that leaves units to others did not), and its product
    when this call made or read one (the Manifest's counts, the Pca, the training Outcome, the EvalResult, …)."""

    stage: str
    out: Path
    up_to_date: bool = False
    finished: bool = False
    product: Any = None


class Advance(Protocol):
    """A progress bar's `advance(n=1, note=None)`."""

    def __call__(self, n: int = 1, note: str | None = None) -> None: ...


class Reporter(Protocol):
    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def progress(self, description: str, total: int) -> contextlib.AbstractContextManager[Advance]:
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
    def progress(self, description: str, total: int) -> Iterator[Advance]:
        yield lambda n=1, note=None: None


def say_why_redone(stage: Stage, force: bool, reporter: Reporter) -> None:
    """The first line of a run that redoes a finished stage: why (a setting or input changed, a new stage
    version, a damaged marker, --force), so that hours of work are never redone without a word."""
    if force and (stage.out / MARKER).is_file():
        reporter.info(f"{stage.name}: --force: redoing {stage.out}")
    elif (reason := stage.stale_reason()) is not None:
        reporter.info(f"{stage.name}: redoing {stage.out}: {reason}")


def task_slice(n_units: int, task_index: int | None, num_tasks: int | None) -> range:
    """Units owned by array task i of T: [⌊iU/T⌋, ⌊(i+1)U/T⌋); all units without task flags."""
    if task_index is None and num_tasks is None:
        return range(n_units)
    from pipeline.errors import PipeError

    if task_index is None or num_tasks is None:
        raise PipeError("expected both a task index and the number of tasks, found only one "
                        "(SLURM_ARRAY_TASK_COUNT is not trusted: it is 1 when a single failed index is resubmitted)",
                        option="num_tasks" if num_tasks is None else "task_index")
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise PipeError(f"expected a task index in 0..{num_tasks - 1} for {num_tasks} tasks, got {task_index}",
                        option="task_index")
    return range(task_index * n_units // num_tasks, (task_index + 1) * n_units // num_tasks)


def versions() -> dict[str, int]:
    """Each stage's current VERSION by the name its done marker records (for `status`: a folder finished by an
    earlier version is stale)."""
    from stages import ablate, evaluate, figure1, pca, report, shard, synth, train

    return {"synth": synth.VERSION, "shard-train": shard.VERSION, "shard-val": shard.VERSION, "pca-stats": pca.VERSION,
            "train": train.VERSION, "eval": evaluate.VERSION, "report": report.VERSION, "ablate": ablate.VERSION,
            "figure1": figure1.VERSION}
