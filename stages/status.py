"""`alexnet-pipe status`: every stage folder under WORK and what it holds.

A stage folder is one holding `_stage.json`, `_plan.json` or `_run.json`, wherever it lies; the stages of the
default layout (the Makefile's) are listed even before they start. Bookkeeping folders (`.locks`, `_units`, …)
are never listed. A finished shard set whose files no longer match its manifest is shown as damaged.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.cache import MARKER, PLAN, StageState, inspect, read_json
from pipeline.shards import damaged_shards, load_manifest
from stages.train import RUN_SETTINGS

STAGE_FILES = (MARKER, PLAN, RUN_SETTINGS)
DEFAULT_LAYOUT = (("synth", "demo-data"), ("shard train", "shards/train"), ("shard val", "shards/val"),
                  ("pca-stats", "pca"))


def stage_rows(work: Path) -> list[tuple[str, Path, StageState]]:
    found = find_stage_folders(work)
    rows = [(name, work / rel) for name, rel in DEFAULT_LAYOUT]
    for kind, missing_name in (("runs", "train"), ("eval", "eval")):
        if not any(f.parent == work / kind for f in found):
            rows.append((missing_name, work / kind))
    listed = {folder for _, folder in rows}
    rows += [(_row_name(folder, work), folder) for folder in found if folder not in listed]
    return [(name, folder, state_of(folder)) for name, folder in rows]


def find_stage_folders(work: Path) -> list[Path]:
    """Stage folders anywhere under `work` (not following links), in path order; bookkeeping is not descended."""
    found = []
    for root, dirs, files in os.walk(work):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        if any(f in files for f in STAGE_FILES):
            found.append(Path(root))
    return sorted(found)


def state_of(folder: Path) -> StageState:
    """`inspect`, plus the cheap integrity check of a finished shard set (sizes against the manifest)."""
    state = inspect(folder)
    if state.state == "done" and _stage_name(folder).startswith("shard"):
        manifest = folder / "manifest.json"
        damaged = damaged_shards(folder, load_manifest(folder)) if manifest.is_file() else ["manifest.json"]
        if damaged:
            shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
            return StageState("damaged", f"{len(damaged)} shard(s) missing or changed in size: {shown}; "
                                         f"`alexnet-pipe verify {folder}` checks them, `shard` rewrites them")
    if state.state == "missing" and (folder / RUN_SETTINGS).is_file():
        return StageState("partial", "training started (no finished marker)")
    return state


def _stage_name(folder: Path) -> str:
    for name in (MARKER, PLAN):
        if (folder / name).is_file():
            return str(read_json(folder / name).get("stage", ""))
    return "train" if (folder / RUN_SETTINGS).is_file() else ""


def _row_name(folder: Path, work: Path) -> str:
    """The default layout's names (`train demo`, `eval demo`, `report demo`); elsewhere the stage's own name."""
    rel = folder.relative_to(work).parts
    if len(rel) == 2 and rel[0] == "runs":
        return f"train {rel[1]}"
    if len(rel) == 2 and rel[0] == "eval":
        return f"eval {rel[1]}"
    if len(rel) == 3 and rel[0] == "eval" and rel[2] == "report":
        return f"report {rel[1]}"
    return _stage_name(folder).replace("shard-", "shard ") or str(folder.relative_to(work))
