"""`predict`: classify one's own images with a checkpoint, the paper's test preprocessing (not cached: a record per
image, handed to `on_record` as it is made)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.engine import QuietReporter, Reporter, StageResult
from pipeline.errors import PipeError
from pipeline.records import Prediction


def run(run_or_checkpoint: Path, images: list[Path], *, top: int = 5, ten_crop: bool = False,
        devices: str = "auto", batch_size: int = 32,
        on_record: Callable[[Prediction], None] = lambda record: None,
        reporter: Reporter | None = None) -> StageResult:
    """Each image's record ({"path", "top": [...]} or {"path", "error"}) goes to `on_record`; a file that cannot be
    read is a warning and the others go on. The product is (classified, not classified); none classified is an
    error (exit 2)."""
    reporter = reporter or QuietReporter()
    from pipeline.predict import classify, load_classifier
    from pipeline.train.checkpoints import resolve_checkpoint

    classifier = load_classifier(resolve_checkpoint(run_or_checkpoint, reporter.warn), devices)
    spec_classes = classifier.spec.classes  # None: a checkpoint from before the table was stored (all 1,000)
    trained = spec_classes.trained if spec_classes is not None else range(len(classifier.classes.wnids))
    if len(trained) < 1000:  # a subset (the demo's 10 generated classes): say so before it answers
        names = ", ".join(classifier.classes.names[i] for i in trained[:3]) + (", …" if len(trained) > 3 else "")
        reporter.warn(f"predict: this net was trained on only {len(trained)} classes ({names}); every image is "
                      f"put in one of them, whatever it shows")
    classified = failed = 0
    for record in classify(classifier, images, top=top, ten_crop=ten_crop, batch_size=batch_size):
        if record.error is not None:
            failed += 1
            reporter.warn(f"{record.path}: not classified: {record.error}")
        else:
            classified += 1
        on_record(record)
    if not classified:
        raise PipeError(f"predict: expected at least one readable image, found none among {failed} path(s)")
    reporter.info(f"predict: {classified} image(s) classified{f', {failed} not' if failed else ''} "
                  f"({'10-crop' if ten_crop else 'centre crop'}, step {classifier.step})")
    return StageResult("predict", run_or_checkpoint, finished=True, product=(classified, failed))
