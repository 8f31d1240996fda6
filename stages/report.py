"""Stage `report`: report.md and its plots from a run's metrics.jsonl and an eval's eval.json.

Cached like every stage, so the `make eval` that ends with it does nothing (and plots nothing) the second time.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.artifacts import EVAL, METRICS, REPORT
from pipeline.cache import Input, Stage
from stages import QuietReporter, Reporter, StageResult

VERSION = 1


def run(run_dir: Path, eval_dir: Path, out: Path, *, force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    """The product is report.md's path."""
    reporter = reporter or QuietReporter()
    inputs = {"eval": Input.of_stage(eval_dir, EVAL), "metrics": Input.of_file(run_dir / METRICS)}
    stage = Stage("report", VERSION, out, {}, inputs, product=REPORT, outputs=(REPORT, "*.png"))
    if stage.up_to_date() and not force:
        reporter.info(f"report: up to date ({out / REPORT})")
        return StageResult(stage.name, out, up_to_date=True)
    from pipeline.report import write_report

    started = time.time()
    with stage.run_lock(exclusive=True):
        stage.plan(["report"], force=force)
        finished = stage.finalize(lambda: write_report(run_dir, eval_dir, out), started=started)
    reporter.info(f"report: {out / REPORT}")
    return StageResult(stage.name, out, finished=finished, product=out / REPORT)
