"""`predict`: classify one's own images with a checkpoint, the paper's test preprocessing (not cached: a record per
image, handed to `on_record` as it is made)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.errors import PipeError
from stages import QuietReporter, Reporter, StageResult


def run(run_or_checkpoint: Path, images: list[Path], *, top: int = 5, ten_crop: bool = False,
        devices: str = "auto", batch_size: int = 32, on_record: Callable[[dict], None] = lambda record: None,
        reporter: Reporter | None = None) -> StageResult:
    """Each image's record ({"path", "top": [...]} or {"path", "error"}) goes to `on_record`; a file that cannot be
    read is a warning and the others go on. The product is (classified, not classified); none classified is an
    error (exit 2)."""
    reporter = reporter or QuietReporter()
    from pipeline.checkpoints import resolve_checkpoint
    from pipeline.predict import classify, load_classifier

    classifier = load_classifier(resolve_checkpoint(run_or_checkpoint, reporter.warn), devices)
    if (known := len(classifier.classes.wnids)) < 1000:  # a subset (the demo's 10 generated classes): say so
        names = ", ".join(classifier.classes.names[:3]) + (", …" if known > 3 else "")
        reporter.warn(f"predict: this net knows only the {known} classes it was trained on ({names}); every image "
                      f"is put in one of them, whatever it shows")
    classified = failed = 0
    for record in classify(classifier, images, top=top, ten_crop=ten_crop, batch_size=batch_size):
        if "error" in record:
            failed += 1
            reporter.warn(f"{record['path']}: not classified: {record['error']}")
        else:
            classified += 1
        on_record(record)
    if not classified:
        raise PipeError(f"predict: expected at least one readable image, found none among {failed} path(s)")
    reporter.info(f"predict: {classified} image(s) classified{f', {failed} not' if failed else ''} "
                  f"({'10-crop' if ten_crop else 'centre crop'}, step {classifier.step})")
    return StageResult("predict", run_or_checkpoint, finished=True, product=(classified, failed))
