"""Stage `report`: report.md and its plots from a run's metrics.jsonl and an eval's eval.json.

Cached like every stage, so the `make eval` that ends with it does nothing (and plots nothing) the second time.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.engine import Input, QuietReporter, Reporter, Stage, StageResult
from pipeline.errors import PipeError
from pipeline.records import EVAL, METRICS, REPORT, EvalResult, read_metrics
from pipeline.train.state import eval_is_of_run

VERSION = 1


def run(run_dir: Path, eval_dir: Path, out: Path, *, force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    """The product is report.md's path."""
    reporter = reporter or QuietReporter()
    inputs = {"eval": Input.of_stage(eval_dir, EVAL), "metrics": Input.of_file(run_dir / METRICS)}
    mismatch = eval_is_of_run(run_dir, EvalResult.read(eval_dir / EVAL).checkpoint)
    if mismatch:
        raise PipeError(f"{eval_dir / EVAL}: expected the eval of this run's checkpoint, but {mismatch}; evaluate "
                        f"this run (`alexnet-pipe eval {run_dir} …`), or report the run that eval belongs to")
    stage = Stage("report", VERSION, out, {}, inputs, product=REPORT, outputs=(REPORT, "*.png"))

    def write() -> StageResult:
        from pipeline.report import metrics_cut_short, write_report

        if cut_short := metrics_cut_short(read_metrics(run_dir), EvalResult.read(eval_dir / EVAL).checkpoint.step):
            reporter.warn(f"report: {cut_short}")
        finished = stage.finalize(lambda: write_report(run_dir, eval_dir, out))
        reporter.info(f"report: {out / REPORT}")
        return StageResult(stage.name, out, finished=finished, product=out / REPORT)

    return stage.execute(write, say=reporter, force=force, shown=out / REPORT, units=["report"])
