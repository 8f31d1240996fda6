"""One module per DAG stage: each declares its name, `VERSION`, params and inputs, and calls `pipeline/`; the
preamble they share (up to date? why redone? the run lock, the plan) is `pipeline.engine.Stage.execute`. Stages never
import each other: the CLI composes them (a sweep is handed the train and eval stages it runs).

Stages report through a `pipeline.engine.Reporter` (the CLI's rich progress, or `QuietReporter` in tests and batch
jobs) and never print themselves; each returns a `pipeline.engine.StageResult`.
"""

from __future__ import annotations


def versions() -> dict[str, int]:
    """Each stage's current VERSION by the name its done marker records (for `status`: a folder finished by an
    earlier version is stale)."""
    from stages import ablate, evaluate, figure1, pca, report, shard, synth, train

    return {"synth": synth.VERSION, "shard-train": shard.VERSION, "shard-val": shard.VERSION, "pca-stats": pca.VERSION,
            "train": train.VERSION, "eval": evaluate.VERSION, "report": report.VERSION, "ablate": ablate.VERSION,
            "figure1": figure1.VERSION}
