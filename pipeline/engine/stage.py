"""`Stage`: one run of a stage over one output folder, the preamble every stage shares written once (`execute`):
up to date → say so and return; else say why it is redone, take the run lock, plan the units, run the body.

A stage folder holds
  _stage.json        the done marker (written last, atomically): key, params, inputs, timings
  _plan.json         the key and unit list of the run in progress, so `status` can say "partial k of n"
  _units/<u>.json    one record per finished unit, written after the unit's own files were renamed into place
  .locks/            flock files: `run` (one full run at a time), `finalize`, and one per unit
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.engine.files import (
    file_lock,
    read_json,
    remove_temp_files,
    sha256_file,
    unwritable_is_user_error,
    write_json,
)
from pipeline.engine.keys import (
    MARKER,
    Input,
    describe_changes,
    fingerprint_source,
    recorded_input,
    recorded_input_path,
    stage_key,
)
from pipeline.engine.pool import LOCKS, UNITS, run_units, unit_record_path
from pipeline.errors import PipeError, StageBusy
from pipeline.records.base import Record
from pipeline.records.stage import StageMarker, StagePlan

PLAN = "_plan.json"


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
    """Where a stage's lines go: the CLI's console and progress bars, or `QuietReporter` in tests and batch jobs."""

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


@dataclass
class Stage:
    """One run of a stage over one output folder."""

    name: str
    version: int
    out: Path
    params: dict
    inputs: dict[str, Input] = field(default_factory=dict)
    product: str | None = None  # the file downstream stages digest (manifest.json, pca.json, …)
    outputs: tuple[str, ...] = ()  # globs of this stage's files, removed when the key changes
    # earlier VERSIONs whose finished units this one still uses (only the product changed): kept across the bump
    unit_versions: tuple[int, ...] = ()
    label: str = ""  # the name its lines say (`shard train`); its name when empty
    started: float = field(default_factory=time.time)  # when this run began: the done marker's `seconds`

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    @property
    def key(self) -> str:
        return self._key(self.version)

    def _key(self, version: int) -> str:
        return stage_key(self.name, version, self.params, {k: v.digest for k, v in self.inputs.items()})

    def marker(self) -> StageMarker | None:
        """The done marker; None when there is none or it was cut short (then the stage is redone)."""
        p = self.out / MARKER
        try:
            return StageMarker.read(p) if p.is_file() else None
        except PipeError:
            return None

    def up_to_date(self) -> bool:
        m = self.marker()
        return m is not None and m.key == self.key

    def stale_reason(self) -> str | None:
        """Why a finished stage no longer matches this configuration, with the old and new values (None if it
        matches or never finished)."""
        if (self.out / MARKER).is_file() and self.marker() is None:
            return f"its {MARKER} is damaged (not valid JSON)"
        m = self.marker()
        if m is None or m.key == self.key:
            return None
        if m.version != self.version:
            return f"stage version {m.version} → {self.version}"
        changed = [k for k, v in self.inputs.items() if (k not in m.inputs or m.inputs[k].digest != v.digest)]
        if changed:
            return "input changed: " + ", ".join(changed)
        diff = describe_changes(m.params, self.params)
        return f"params changed: {diff}" if diff else "key changed"

    # -- running ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def run_lock(self, exclusive: bool, splittable: bool = False) -> Iterator[None]:
        """A full run (no task flags) holds the run lock throughout; array tasks share the folder without it.
        `splittable`: the stage takes --task-index/--num-tasks (the message then says so)."""
        if not exclusive:
            yield
            return
        lock = self.out / LOCKS / "run"
        with file_lock(lock, blocking=False) as got:
            if not got:
                holder = lock.read_text().strip() if lock.exists() else "another process"
                raise StageBusy(f"stage {self.name} is already running in {self.out} ({holder}); wait for it"
                                + (", or split the work with --task-index/--num-tasks" if splittable else ""))
            yield

    def plan(self, units: list[str], force: bool = False) -> None:
        """Record the unit list for this key; a different key (or --force) first removes the old outputs, unless
        it is this stage's key under one of `unit_versions` (then its units are kept, its done marker goes). Units
        only accumulate under one key: a stage that learns its units from a first unit plans twice."""
        with unwritable_is_user_error(self.out / PLAN):
            self.out.mkdir(parents=True, exist_ok=True)
        with file_lock(self.out / LOCKS / "finalize", blocking=True):
            p = self.out / PLAN
            old = StagePlan.read(p) if p.is_file() else None
            marker = self.marker()
            old_key = old.key if old else marker.key if marker else None
            reusable = {self.key, *(self._key(v) for v in self.unit_versions)}
            if force or (old_key is not None and old_key not in reusable):
                self.clear()
                old = None
            elif old_key is not None and old_key != self.key:
                (self.out / MARKER).unlink(missing_ok=True)  # an earlier version's product: not done any more
            known = list(old.units) if old is not None and old.key in reusable else []
            merged = known + [u for u in units if u not in known]
            if old is None or merged != known or old.key != self.key:
                write_json(p, StagePlan(self.name, self.key, tuple(merged)).to_json())

    def reopen(self, units: Iterable[str]) -> None:
        """Finished units whose files were found damaged become to-do again: their records and the done marker
        go, everything else is kept (the rerun rewrites exactly those units, then finalizes)."""
        with file_lock(self.out / LOCKS / "finalize", blocking=True):
            (self.out / MARKER).unlink(missing_ok=True)
            for unit in units:
                self.unit_record_path(unit).unlink(missing_ok=True)

    def clear(self) -> None:
        (self.out / MARKER).unlink(missing_ok=True)
        for pattern in (*self.outputs, f"{UNITS}/*.json", PLAN):
            for f in self.out.glob(pattern):
                f.unlink()
        remove_temp_files(self.out)

    def unit_record_path(self, unit: str) -> Path:
        return unit_record_path(self.out, unit)

    def unit_done(self, unit: str) -> bool:
        return self.unit_record_path(unit).is_file()

    def records(self, units: Iterable[str]) -> dict[str, dict]:
        return {u: read_json(self.unit_record_path(u)) for u in units}

    def run_units(self, units: list[str], work: Callable[[str], Record], *, workers: int = 1,
                  on_done: Callable[[str, dict], None] | None = None, wait_for_others: bool = True) -> None:
        """`pipeline.engine.pool.run_units` in this stage's folder."""
        run_units(self.out, units, work, workers=workers, on_done=on_done, wait_for_others=wait_for_others)

    def finalize(self, write_products: Callable[[], object], **counted: Any) -> bool:
        """Under the finalize lock: write the products, then the done marker last (with what the stage `counted`:
        images, samples, shards, runs, final). False if already done."""
        with file_lock(self.out / LOCKS / "finalize", blocking=True):
            if self.up_to_date():
                return False
            write_products()
            remove_temp_files(self.out)
            write_json(self.out / MARKER, StageMarker(
                self.name, self.key, self.version, self.params,
                {k: recorded_input(v, self.out) for k, v in self.inputs.items()}, self.product,
                round(time.time() - self.started, 3), **counted).to_json())
            return True

    # -- the preamble every stage shares -----------------------------------------------------------------------

    def execute(self, body: Callable[[], StageResult], *, say: Reporter, force: bool = False,
                shown: Path | None = None, units: list[str] | None = None, exclusive: bool = True,
                splittable: bool = False, damaged: Callable[[], object] | None = None,
                explain: bool = True) -> StageResult:
        """Run `body` as this stage: when up to date (and `damaged()`, asked only then, finds nothing), say so
        and return at once; else say why it is redone (so that hours of work are never redone without a word;
        `explain=False` where the stage's own first line says it, as train's "resuming from …" does),
        take the run lock (`exclusive`: a full run; array tasks share the folder), plan `units` and run `body`,
        which ends with `finalize`."""
        if self.up_to_date() and not force and not (damaged and damaged()):
            say.info(f"{self.label}: up to date ({shown or self.out})")
            return StageResult(self.name, self.out, up_to_date=True)
        if explain and force and (self.out / MARKER).is_file():
            say.info(f"{self.label}: --force: redoing {self.out}")
        elif explain and (reason := self.stale_reason()) is not None:
            say.info(f"{self.label}: redoing {self.out}: {reason}")
        self.started = time.time()
        with self.run_lock(exclusive, splittable):
            if units is not None:
                self.plan(units, force=force)
            return body()


@dataclass(frozen=True)
class StageState:
    state: str  # done | stale | partial | missing
    detail: str = ""


def inspect(folder: Path) -> StageState:
    """What a stage folder holds, re-checking recorded input digests (used by `alexnet-pipe status`)."""
    marker_path, plan_path = folder / MARKER, folder / PLAN
    if marker_path.is_file():
        marker = StageMarker.read(marker_path)
        for name, inp in marker.inputs.items():
            path = recorded_input_path(folder, inp)
            if not path.exists():
                return StageState("stale", f"input {name} missing: {path}")
            if inp.digest.startswith("fp:"):
                digest = fingerprint_source(path)
            elif path.is_file():
                digest = "sha256:" + sha256_file(path)
            elif (path / MARKER).is_file():
                digest = "sha256:" + sha256_file(path / _product_of(path))
            else:
                return StageState("stale", f"input {name} is no longer a finished stage: {path}")
            if digest != inp.digest:
                return StageState("stale", f"input {name} changed ({path})")
        return StageState("done", f"key {marker.key}, {marker.seconds:.1f} s")
    if plan_path.is_file():
        units = StagePlan.read(plan_path).units
        done = sum((folder / UNITS / f"{u}.json").is_file() for u in units)
        return StageState("partial", f"{done} of {len(units)} units")
    return StageState("missing")


def finished_marker(folder: Path) -> StageMarker | None:
    """The done marker of the stage in `folder` (None: not finished)."""
    return StageMarker.read(folder / MARKER) if (folder / MARKER).is_file() else None


def stage_input_path(folder: Path, name: str) -> Path | None:
    """Where input `name` of the finished stage in `folder` is now (`recorded_input_path`); None if not recorded."""
    marker = finished_marker(folder)
    recorded = marker.inputs.get(name) if marker else None
    return recorded_input_path(folder, recorded) if recorded else None


def _product_of(folder: Path) -> str:
    marker = finished_marker(folder)
    if marker is None or not marker.product:
        raise PipeError(f"{folder}: no finished stage with a product file")
    return marker.product
