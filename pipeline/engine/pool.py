"""Running a stage's units: each under its own lock, in this process or a pool of worker processes, each unit's
record written after its files; array tasks take their slice of the units."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.engine.files import file_lock, read_json, write_json
from pipeline.errors import PipeError
from pipeline.records.base import Record

UNITS = "_units"
LOCKS = ".locks"


def unit_record_path(out: Path, unit: str) -> Path:
    return out / UNITS / f"{unit}.json"


@dataclass(frozen=True)
class _UnitJob:
    """Runs one unit under its lock and writes its record; picklable so worker processes can run it."""

    out: str
    work: Callable[[str], Record]

    def __call__(self, unit: str) -> tuple[str, dict | None]:
        out = Path(self.out)
        record_path = unit_record_path(out, unit)
        with file_lock(out / LOCKS / f"unit-{unit}", blocking=False) as got:
            if not got:
                return unit, None
            if record_path.is_file():  # finished by another process between our check and our lock
                return unit, read_json(record_path)
            record = self.work(unit).to_json()
            write_json(record_path, record)
            return unit, record


_worker_job: _UnitJob | None = None  # set once in each worker process by _start_worker


def _start_worker(parent: int, job: _UnitJob) -> None:
    """A worker gets the job once, here, and each task only its unit's name: `pool.map(job, …)` would pickle the
    job with every task, and a job that holds something for each unit (pca-stats' sample positions per shard)
    then costs units² to send."""
    global _worker_job
    _worker_job = job
    exit_with_parent(parent)


def _run_in_worker(unit: str) -> tuple[str, dict | None]:
    assert _worker_job is not None  # the pool's initializer sets it
    return _worker_job(unit)


def exit_with_parent(parent: int) -> None:
    """A worker whose parent was SIGKILLed would wait on its task queue forever: poll the parent and leave."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _report(results: Iterable[tuple[str, dict | None]], on_done) -> Iterator[tuple[str, dict | None]]:
    for unit, rec in results:
        if rec is not None and on_done is not None:
            on_done(unit, rec)
        yield unit, rec


def run_units(out: Path, units: list[str], work: Callable[[str], Record], *, workers: int = 1,
              on_done: Callable[[str, dict], None] | None = None, wait_for_others: bool = True) -> None:
    """Run every unit of `units` whose record is not written yet. `work(unit)` writes the unit's files atomically
    and returns its record, written as JSON after them (`work` picklable: a top-level callable when workers > 1).
    A unit locked by another process is left to it; with `wait_for_others`, this run then waits for those units
    to appear."""
    todo = [u for u in units if not unit_record_path(out, u).is_file()]
    job = _UnitJob(str(out), work)
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_start_worker,
                                 initargs=(os.getpid(), job)) as pool:
            results = list(_report(pool.map(_run_in_worker, todo), on_done))
    else:
        results = list(_report(map(job, todo), on_done))
    held = [u for u, rec in results if rec is None]
    if held and wait_for_others:
        for u in held:
            with file_lock(out / LOCKS / f"unit-{u}", blocking=True):
                pass
            if not unit_record_path(out, u).is_file():  # its holder died: do it ourselves
                list(_report(map(job, [u]), on_done))


def task_slice(n_units: int, task_index: int | None, num_tasks: int | None) -> range:
    """Units owned by array task i of T: [⌊iU/T⌋, ⌊(i+1)U/T⌋); all units without task flags."""
    if task_index is None and num_tasks is None:
        return range(n_units)
    if task_index is None or num_tasks is None:
        raise PipeError("expected both a task index and the number of tasks, found only one "
                        "(SLURM_ARRAY_TASK_COUNT is not trusted: it is 1 when a single failed index is resubmitted)",
                        option="num_tasks" if num_tasks is None else "task_index")
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise PipeError(f"expected a task index in 0..{num_tasks - 1} for {num_tasks} tasks, got {task_index}",
                        option="task_index")
    return range(task_index * n_units // num_tasks, (task_index + 1) * n_units // num_tasks)
