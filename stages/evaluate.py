"""Stage `eval`: top-1/top-5 error of a checkpoint on the val shards, centre crop and the paper's 10-crop test, and
the paper's Figures 3 and 4 → eval.json.

Everything the model needs (width, crop, classes, mean, LRN convention) comes from the checkpoint's spec.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.board import BOARD, eval_events
from pipeline.engine import Input, QuietReporter, Reporter, Stage, StageResult, write_json
from pipeline.errors import PipeError
from pipeline.record import run_record
from pipeline.records import EVAL, MANIFEST, CheckpointRef, EvalResult, Manifest, RunSpec
from pipeline.train.checkpoints import CheckpointGone, resolve_checkpoint

VERSION = 3  # 2: the paper's Figure 3 (and Figure 4 with --train); 3: Figure 3's neighbour correlation (also at
# step 0) and, with --train, the training error measured as val's
ROTATION_RETRIES = 3  # a run that rotates its checkpoints may delete the newest while eval reads it
NEIGHBOUR_TRAIN_IMAGES = 10_000  # Figure 4's default bound on the pass over the training shards


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate (none of it changes which checkpoint or val shards are evaluated)."""

    ten_crop: bool = True
    devices: str = "auto"
    batch_size: int = 64
    loader: str = "dali"
    loader_threads: int = 2
    train_dir: Path | None = None
    neighbour_train_images: int | None = None
    untrained_val_classes: bool = False  # accept val classes the run never trained on


def run(run_or_checkpoint: Path, val_dir: Path, out: Path, *, ten_crop: bool = True, devices: str = "auto",
        batch_size: int = 64, loader: str = "dali", loader_threads: int = 2, train_dir: Path | None = None,
        neighbour_train_images: int | None = None, untrained_val_classes: bool = False, force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    """With `train_dir` (the run's own training shards), also the training error measured as val's (eval mode,
    centre crop, on as many training images as val holds: the train–val gap) and Figure 4's nearest training images
    of five val images, over the first `neighbour_train_images` (default NEIGHBOUR_TRAIN_IMAGES; 0: no Figure 4)
    training images. The product is the EvalResult."""
    reporter = reporter or QuietReporter()
    options = EvalOptions(ten_crop, devices, batch_size, loader, loader_threads, train_dir,
                          NEIGHBOUR_TRAIN_IMAGES if train_dir is not None and neighbour_train_images is None
                          else neighbour_train_images, untrained_val_classes)
    retries = 0
    while True:
        checkpoint = resolve_checkpoint(run_or_checkpoint, reporter.warn)
        try:
            return _evaluate(checkpoint, val_dir, out, options, force, reporter)
        except CheckpointGone:
            retries += 1
            if run_or_checkpoint.is_file() or retries > ROTATION_RETRIES:
                raise
            reporter.info(f"eval: {checkpoint} was deleted by its run (rotation) before it was read; taking the "
                          "newest again")


def _evaluate(checkpoint: Path, val_dir: Path, out: Path, options: EvalOptions, force: bool,
              reporter: Reporter) -> StageResult:
    try:
        checkpoint_input = Input.of_file(checkpoint)
    except (PipeError, FileNotFoundError):
        if checkpoint.exists():
            raise
        raise CheckpointGone(f"{checkpoint}: deleted before it was read") from None
    inputs = {"checkpoint": checkpoint_input, "val": Input.of_stage(val_dir, MANIFEST)}
    params: dict = {"ten_crop": options.ten_crop}
    if options.train_dir is not None:
        inputs["train"] = Input.of_stage(options.train_dir, MANIFEST)
        params |= {"neighbour_train_images": options.neighbour_train_images, "train_error": True}
    stage = Stage("eval", VERSION, out, params, inputs, product=EVAL, outputs=(EVAL,))
    return stage.execute(lambda: _errors_and_figures(stage, checkpoint, val_dir, options, reporter),
                         say=reporter, force=force, shown=out / EVAL, units=["eval"])


def _errors_and_figures(stage: Stage, checkpoint: Path, val_dir: Path, options: EvalOptions,
                        reporter: Reporter) -> StageResult:
    """One load of the checkpoint for the errors (centre, 10-crop, per class), the training error measured as val's,
    and Figures 3 and 4 → eval.json."""
    train_dir = options.train_dir
    manifest = Manifest.read(val_dir).require_split("val", val_dir, option="val")  # before torch and the load
    if train_dir is not None:
        Manifest.read(train_dir).require_split("train", train_dir, option="train")
    from pipeline.cluster import resolve_devices
    from pipeline.evaluate import evaluate_classifier
    from pipeline.figures import figure3, figure4
    from pipeline.model import initial_model
    from pipeline.predict import load_classifier

    inputs = stage.inputs
    classifier = load_classifier(checkpoint, resolve_devices(options.devices))  # one load for errors and figures
    if train_dir is not None:
        _require_its_training_set(classifier.spec, checkpoint, train_dir, inputs["train"].digest)
    ref = CheckpointRef(str(checkpoint), classifier.step, classifier.epoch,
                        inputs["checkpoint"].digest.removeprefix("sha256:"))
    result = evaluate_classifier(classifier, ref, val_dir, manifest, ten_crop=options.ten_crop,
                                 batch_size=options.batch_size, loader=options.loader,
                                 loader_threads=options.loader_threads, warn=reporter.warn,
                                 progress=reporter.progress, untrained_val_classes=options.untrained_val_classes)
    neighbours, train_errors = None, None
    if train_dir is not None:
        from pipeline.evaluate import training_subset_errors

        train_errors = training_subset_errors(classifier, train_dir, manifest.samples, options.batch_size)
        reporter.info(f"eval: {train_errors.samples} training images (eval mode, centre crop): top-1/top-5 "
                      f"error {train_errors.top1_error:.4f}/{train_errors.top5_error:.4f}")
    if train_dir is not None and options.neighbour_train_images:
        neighbours = figure4(classifier.model, val_dir, train_dir, classifier.spec.pixels,
                             classifier.spec.model.crop, limit=options.neighbour_train_images)
        reporter.info(f"eval: nearest training images of {len(neighbours.queries)} val images over "
                      f"{neighbours.train_images} training images")
    result = replace(result, val=replace(result.val, manifest_sha256=inputs["val"].digest.removeprefix("sha256:")),
                     train_centre=train_errors, figure3=figure3(classifier.model, initial_model(
                         classifier.spec.model, classifier.spec.train.seed)), figure4=neighbours,
                     run_record=run_record())  # what it ran on: in eval.json, outside the stage's key
    stage.finalize(lambda: write_json(stage.out / EVAL, result.to_json()))
    eval_events(stage.out / BOARD, result, reporter.warn)  # a view of eval.json, written once it is
    reporter.info(summary(result) + f" → {stage.out / EVAL}")
    return StageResult("eval", stage.out, finished=True, product=result)


def _require_its_training_set(spec: RunSpec, checkpoint: Path, train_dir: Path, digest: str) -> None:
    """The training error and Figure 4 are of the shards the run trained on (its spec records their manifest)."""
    trained = spec.inputs.train if spec.inputs else None
    if trained is not None and trained != digest:
        raise PipeError(f"{train_dir}: expected the training shards {checkpoint} was trained on (manifest "
                        f"{trained.removeprefix('sha256:')[:12]}…), found other shards (manifest "
                        f"{digest.removeprefix('sha256:')[:12]}…); give `--train` the run's own training shards",
                        option="train")


def summary(result: EvalResult) -> str:
    line = (f"eval: {result.samples} val images, centre crop top-1/top-5 error {result.centre.top1_error:.4f}/"
            f"{result.centre.top5_error:.4f}")
    if result.ten_crop is not None:
        line += f", 10-crop {result.ten_crop.top1_error:.4f}/{result.ten_crop.top5_error:.4f}"
    return line
