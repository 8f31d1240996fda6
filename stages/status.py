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


def stage_versions() -> dict[str, int]:
    """Each stage's current VERSION by the name its done marker records."""
    from stages import ablate, evaluate, figure1, pca, report, shard, synth, train

    return {"synth": synth.VERSION, "shard-train": shard.VERSION, "shard-val": shard.VERSION, "pca-stats": pca.VERSION,
            "train": train.VERSION, "eval": evaluate.VERSION, "report": report.VERSION, "ablate": ablate.VERSION,
            "figure1": figure1.VERSION}


def state_of(folder: Path) -> StageState:
    """`inspect`, plus the cheap integrity check of a finished shard set (sizes against the manifest) and the
    stage's VERSION (a folder finished by an earlier version is redone by the next run of its stage)."""
    state = inspect(folder)
    marker = read_json(folder / MARKER) if state.state == "done" else {}
    current = stage_versions().get(marker.get("stage", ""))
    if current is not None and marker.get("version") != current:
        command = "shard" if marker["stage"].startswith("shard-") else marker["stage"]
        return StageState("stale", f"written by stage version {marker.get('version')}, now {current}: the next "
                                   f"`{command}` run redoes it")
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


def run_progress(work: Path, now: float | None = None) -> list[dict]:
    """Per training run found under WORK: the step and epoch reached, the last val error and, while the run
    advances, its rate and an estimate of the time left (from metrics.jsonl's wall-clock `time` and events.jsonl's
    totals)."""
    import time

    from pipeline.record import read_events
    from pipeline.report import read_metrics

    now = time.time() if now is None else now
    rows = []
    for run in (f for f in find_stage_folders(work) if (f / RUN_SETTINGS).is_file()):
        steps, epochs = read_metrics(run)
        events = read_events(run)
        if not steps and not events:
            continue
        total = events[-1].get("total_steps") if events else None
        last = steps[-1] if steps else {"step": events[-1].get("step", 0), "epoch": events[-1].get("epoch", 0)}
        row = {"run": str(run.relative_to(work)), "step": last["step"], "total_steps": total, "epoch": last["epoch"],
               "val_top1_error": epochs[-1]["val_top1_error"] if epochs else None, "state": "done",
               "steps_per_s": None, "images_per_s": None, "eta_s": None}
        if last["step"] < total if total is not None else not (run / MARKER).is_file():
            # the step records of the latest start or resume, with their wall-clock times
            since = events[-1]["time"] if events else 0
            recent = [s for s in steps if s.get("time", 0) >= since][-20:]
            row["state"] = "stopped"
            if len(recent) >= 2 and recent[-1]["time"] > recent[0]["time"]:
                rate = (recent[-1]["step"] - recent[0]["step"]) / (recent[-1]["time"] - recent[0]["time"])
                interval = (recent[-1]["time"] - recent[0]["time"]) / (len(recent) - 1)
                if now - recent[-1]["time"] < max(60.0, 10 * interval):  # still logging: in progress
                    row.update(state="running", steps_per_s=round(rate, 3),
                               images_per_s=recent[-1].get("images_per_s"),
                               eta_s=round((total - last["step"]) / rate) if total and rate > 0 else None)
        rows.append(row)
    return rows
