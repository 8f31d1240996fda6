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
