"""`export`: a checkpoint's network for other runtimes, with the preprocessing it expects stored in the file (not
cached: one file, written atomically)."""

from __future__ import annotations

from pathlib import Path

from pipeline.engine import QuietReporter, Reporter, StageResult
from pipeline.errors import PipeError


def run(run_or_checkpoint: Path, out: Path, *, fmt: str | None = None,
        reporter: Reporter | None = None) -> StageResult:
    """`fmt`: pt2 or onnx; by default from `out`'s suffix. The product is the written file."""
    reporter = reporter or QuietReporter()
    from pipeline.export import export_format

    fmt = export_format(out, fmt)  # before the checkpoint is read: a wrong --out costs nothing
    if out.is_dir():
        raise PipeError(f"{out}: expected a file to write, found a folder", option="out")
    from pipeline.engine import sha256_file
    from pipeline.export import export
    from pipeline.predict import load_classifier
    from pipeline.train.checkpoints import resolve_checkpoint

    checkpoint = resolve_checkpoint(run_or_checkpoint, reporter.warn)
    classifier = load_classifier(checkpoint, "cpu")
    export(classifier, out, fmt, sha256_file(checkpoint))
    reporter.info(f"export: {checkpoint} (step {classifier.step}) → {out} ({fmt}, dynamic batch)")
    return StageResult("export", out, finished=True, product=out)
