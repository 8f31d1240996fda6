"""`alexnet-pipe status`: every stage folder under WORK and what it holds.

A stage folder is one holding `_stage.json`, `_plan.json` or `_run.json`, wherever it lies; the stages of the
default layout (the Makefile's) are listed even before they start. Bookkeeping folders (`.locks`, `_units`, …)
are never listed. A finished shard set whose files no longer match its manifest is shown as damaged.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path

from pipeline.engine import MARKER, PLAN, StageState, finished_marker, inspect
from pipeline.errors import PipeError
from pipeline.records import CHECKPOINTS_DIR, MANIFEST, RUN_SETTINGS, Manifest, StageMarker, StagePlan, read_metrics
from pipeline.shards import damaged_shards
from pipeline.train.checkpoints import checkpoint_step, newest_verified
from pipeline.train.state import diverged_record, final_checkpoint_problem

STAGE_FILES = (MARKER, PLAN, RUN_SETTINGS)


@cache
def default_layout() -> dict[str, str]:
    """The Makefile's WORK layout (pipeline/layout.mk: `NAME = relative/path` lines), e.g. PCA_DIR → pca."""
    text = resources.files("pipeline").joinpath("layout.mk").read_text()
    return {name.strip(): value.strip() for name, _, value in (line.partition("=") for line in text.splitlines())
            if value and not name.lstrip().startswith("#")}


def stage_rows(work: Path, versions: dict[str, int]) -> list[tuple[str, Path, StageState]]:
    """(name, folder, state) of every stage folder under `work`; `versions`: each stage's current VERSION by the
    name its done marker records (a folder finished by an earlier version is stale)."""
    found = find_stage_folders(work)
    layout = default_layout()
    named = (("synth", "DEMO_DATA_DIR"), ("shard train", "TRAIN_SHARDS_DIR"), ("shard val", "VAL_SHARDS_DIR"),
             ("pca-stats", "PCA_DIR"))
    rows = [(name, work / layout[key]) for name, key in named]
    for key, missing_name in (("RUNS_DIR", "train"), ("EVALS_DIR", "eval")):
        if not any(f.parent == work / layout[key] for f in found):
            rows.append((missing_name, work / layout[key]))
    listed = {folder for _, folder in rows}
    rows += [(_row_name(folder, work), folder) for folder in found if folder not in listed]
    return [(name, folder, _state_or_damaged(folder, versions)) for name, folder in rows]


def _state_or_damaged(folder: Path, versions: dict[str, int]) -> StageState:
    """A folder whose bookkeeping was cut short (a full disk, a copy interrupted) is one damaged row, not an error
    for the whole table; the next run of its stage redoes it."""
    try:
        return state_of(folder, versions)
    except PipeError as e:
        return StageState("damaged", f"{e}; the next run of its stage redoes it")


def find_stage_folders(work: Path) -> list[Path]:
    """Stage folders anywhere under `work` (not following links), in path order; bookkeeping is not descended."""
    found = []
    for root, dirs, files in os.walk(work):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        if any(f in files for f in STAGE_FILES):
            found.append(Path(root))
    return sorted(found)


def state_of(folder: Path, versions: dict[str, int]) -> StageState:
    """`inspect`, plus the cheap integrity check of a finished shard set (sizes against the manifest) and the
    stage's VERSION (a folder finished by an earlier version is redone by the next run of its stage)."""
    state = inspect(folder)
    marker = finished_marker(folder) if state.state == "done" else None
    current = versions.get(marker.stage) if marker else None
    if marker is not None and current is not None and marker.version != current:
        command = "shard" if marker.stage.startswith("shard-") else marker.stage
        return StageState("stale", f"written by stage version {marker.version}, now {current}: the next "
                                   f"`{command}` run redoes it")
    if state.state == "done" and _stage_name(folder).startswith("shard"):
        manifest = folder / MANIFEST
        damaged = damaged_shards(folder, Manifest.read(folder)) if manifest.is_file() else [MANIFEST]
        if damaged:
            shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
            return StageState("damaged", f"{len(damaged)} shard(s) missing or changed in size: {shown}; "
                                         f"`alexnet-pipe verify {folder}` checks them, `shard` rewrites them")
    if marker is not None and marker.stage == "train":
        problem = final_checkpoint_problem(folder, marker)
        if problem:
            return StageState("damaged", f"the run finished but {problem}; `train` resumes it from the newest good "
                                         "checkpoint to the end")
    if (folder / RUN_SETTINGS).is_file() and (diverged := diverged_record(folder)) is not None:
        return StageState("diverged", f"the loss was not finite at step {diverged.step}; rerun with a lower --lr "
                                      "and --force")
    if state.state == "missing" and (folder / RUN_SETTINGS).is_file():
        return StageState("partial", "training started (no finished marker)")
    return state


def _stage_name(folder: Path) -> str:
    for name, kind in ((MARKER, StageMarker), (PLAN, StagePlan)):
        if (folder / name).is_file():
            with contextlib.suppress(PipeError):  # cut short: the next file, or the folder's path names the row
                return kind.read(folder / name).stage
    return "train" if (folder / RUN_SETTINGS).is_file() else ""


def _row_name(folder: Path, work: Path) -> str:
    """The default layout's names (`train demo`, `eval demo`, `report demo`); elsewhere the stage's own name."""
    rel, layout = folder.relative_to(work), default_layout()
    runs, evals = Path(layout["RUNS_DIR"]), Path(layout["EVALS_DIR"])
    if rel.parent == runs:
        return f"train {rel.name}"
    if rel.parent == evals:
        return f"eval {rel.name}"
    if rel.parent.parent == evals and rel.name == "report":
        return f"report {rel.parent.name}"
    return _stage_name(folder).replace("shard-", "shard ") or str(folder.relative_to(work))


@dataclass(frozen=True)
class RunProgress:
    """Where a training run stands: the step of its newest checkpoint that verifies (what a resume or an eval takes;
    while it runs, the step it logged last), epochs finished (as `train`'s epoch lines count them), the last val
    error and, while it advances, its rate and an estimate of the time left."""

    run: str
    state: str  # done | damaged (its final checkpoint no longer verifies) | stopped | running | diverged
    step: int
    total_steps: int | None
    epochs_done: int
    val_top1_error: float | None
    steps_per_s: float | None = None
    images_per_s: float | None = None
    eta_s: int | None = None


def run_progress(work: Path, now: float | None = None) -> list[RunProgress]:
    """Per training run found under WORK (from metrics.jsonl's wall-clock `time` and events.jsonl's totals)."""
    import time

    from pipeline.record import read_events

    now = time.time() if now is None else now
    rows = []
    for run in (f for f in find_stage_folders(work) if (f / RUN_SETTINGS).is_file()):
        metrics = read_metrics(run)
        steps, epochs = metrics.steps, metrics.epochs
        events = read_events(run)
        if not steps and not events:
            continue
        total = int(events[-1].total_steps) if events and events[-1].total_steps is not None else None
        step = steps[-1].step if steps else events[-1].step
        epochs_done = epochs[-1].epoch + 1 if epochs else (events[-1].epoch if events else 0)
        newest = newest_verified(run / CHECKPOINTS_DIR)
        kept = checkpoint_step(newest) if newest else 0  # the truth on disk, not the last line logged
        row = RunProgress(str(run.relative_to(work)), "done", kept, total, epochs_done,
                          epochs[-1].val_top1_error if epochs else None)
        marker = finished_marker(run) if (run / MARKER).is_file() else None
        if diverged_record(run) is not None:
            row = replace(row, state="diverged")
        elif marker is not None and final_checkpoint_problem(run, marker) is not None:
            row = replace(row, state="damaged")
        elif marker is None or (total is not None and kept < total):
            # the step records of the latest start or resume, with their wall-clock times
            since = events[-1].time if events else 0
            recent = [s for s in steps if (s.time or 0) >= since][-20:]
            row = replace(row, state="stopped")
            first, last = (recent[0], recent[-1]) if len(recent) >= 2 else (None, None)
            if first and last and first.time is not None and last.time is not None and last.time > first.time:
                rate = (last.step - first.step) / (last.time - first.time)
                interval = (last.time - first.time) / (len(recent) - 1)
                if now - last.time < max(60.0, 10 * interval):  # still logging: in progress
                    row = replace(row, state="running", step=step, steps_per_s=round(rate, 3),
                                  images_per_s=last.images_per_s,
                                  eta_s=round((total - step) / rate) if total and rate > 0 else None)
        rows.append(row)
    return rows
