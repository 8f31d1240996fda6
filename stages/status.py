"""`alexnet-pipe status`: the DAG's stage folders under WORK and what each holds."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import StageState, inspect


def stage_rows(work: Path) -> list[tuple[str, Path, StageState]]:
    rows = [("synth", work / "demo-data"), ("shard train", work / "shards" / "train"),
            ("shard val", work / "shards" / "val"), ("pca-stats", work / "pca")]
    for kind in ("runs", "eval"):
        runs = sorted(p for p in (work / kind).glob("*") if p.is_dir())
        rows += [(f"{'train' if kind == 'runs' else 'eval'} {p.name}", p) for p in runs] or [
            ("train" if kind == "runs" else "eval", work / kind)]
    rows += [(f"report {p.parent.name}", p) for p in sorted((work / "eval").glob("*/report")) if p.is_dir()]
    return [(name, folder, inspect(folder)) for name, folder in rows]


def run_progress(work: Path, now: float | None = None) -> list[dict]:
    """Per run under WORK/runs: the step and epoch reached, the last val error and, while the run advances, its
    rate and an estimate of the time left (from metrics.jsonl's wall-clock `time` and events.jsonl's totals)."""
    import time

    from pipeline.record import read_events
    from pipeline.report import read_metrics

    now = time.time() if now is None else now
    rows = []
    for run in sorted(p for p in (work / "runs").glob("*") if p.is_dir()):
        steps, epochs = read_metrics(run)
        events = read_events(run)
        if not steps and not events:
            continue
        total = events[-1].get("total_steps") if events else None
        last = steps[-1] if steps else {"step": events[-1].get("step", 0), "epoch": events[-1].get("epoch", 0)}
        row = {"run": run.name, "step": last["step"], "total_steps": total, "epoch": last["epoch"],
               "val_top1_error": epochs[-1]["val_top1_error"] if epochs else None, "state": "done",
               "steps_per_s": None, "images_per_s": None, "eta_s": None}
        if last["step"] < total if total is not None else not (run / "_stage.json").is_file():
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
