"""Stage `eval`: top-1/top-5 error of a checkpoint on the val shards, centre crop and the paper's 10-crop test.

Everything the model needs (width, crop, classes, mean, LRN convention) comes from the checkpoint's `config`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cache import Input, Stage, write_json
from pipeline.checkpoints import (
    CHECKPOINT_GLOB,
    CHECKPOINTS_DIR,
    checkpoint_problem,
    digest_path,
    newest_good_checkpoint,
)
from pipeline.errors import PipeError
from pipeline.record import run_record
from stages import QuietReporter, Reporter

if TYPE_CHECKING:
    from pipeline.predict import Classifier

VERSION = 2  # 2: eval.json holds the paper's Figure 3 (and Figure 4 with --train)
EXAMPLES = 16
NEIGHBOUR_TRAIN_IMAGES = 10_000  # Figure 4's default bound on the pass over the training shards


def resolve_checkpoint(run_or_checkpoint: Path, reporter: Reporter) -> Path:
    """A run folder means its newest checkpoint that verifies (found by the digests beside them, without importing
    torch: an up-to-date eval and a wrong path return at once); a named file that does not verify is an error."""
    if run_or_checkpoint.is_file():  # without a digest beside it, reading it is the check (load_checkpoint)
        problem = checkpoint_problem(run_or_checkpoint) if digest_path(run_or_checkpoint).is_file() else None
        if problem:
            raise PipeError(f"{run_or_checkpoint}: expected a good checkpoint, found it damaged ({problem})")
        return run_or_checkpoint
    found = newest_good_checkpoint(run_or_checkpoint / CHECKPOINTS_DIR, reporter.warn)
    if found is None:
        raise PipeError(f"{run_or_checkpoint}: expected a checkpoint file or a run folder holding "
                        f"{CHECKPOINTS_DIR}/{CHECKPOINT_GLOB}")
    return found


def run(run_or_checkpoint: Path, val_dir: Path, out: Path, *, ten_crop: bool = True, devices: str = "auto",
        batch_size: int = 64, loader: str = "dali", loader_threads: int = 2, train_dir: Path | None = None,
        neighbour_train_images: int | None = None, force: bool = False,
        reporter: Reporter | None = None) -> dict | None:
    """With `train_dir`, also Figure 4's nearest training images of five val images, over the first
    `neighbour_train_images` (default NEIGHBOUR_TRAIN_IMAGES) training images."""
    reporter = reporter or QuietReporter()
    checkpoint = resolve_checkpoint(run_or_checkpoint, reporter)
    inputs = {"checkpoint": Input.of_file(checkpoint), "val": Input.of_stage(val_dir, "manifest.json")}
    params: dict = {"ten_crop": ten_crop}
    if train_dir is not None:
        inputs["train"] = Input.of_stage(train_dir, "manifest.json")
        params["neighbour_train_images"] = neighbour_train_images = neighbour_train_images or NEIGHBOUR_TRAIN_IMAGES
    stage = Stage("eval", VERSION, out, params, inputs, product="eval.json", outputs=("eval.json",))
    if stage.up_to_date() and not force:
        reporter.info(f"eval: up to date ({out / 'eval.json'})")
        return None
    started = time.time()
    with stage.run_lock(exclusive=True):
        stage.plan(["eval"], force=force)
        manifest = val_manifest(val_dir)  # a wrong folder is refused before torch and the checkpoint load
        from pipeline.cluster import resolve_devices
        from pipeline.predict import load_classifier

        classifier = load_classifier(checkpoint, resolve_devices(devices))  # one load for errors and figures
        result = evaluate_checkpoint(classifier, checkpoint, val_dir, manifest, ten_crop=ten_crop,
                                     batch_size=batch_size, loader=loader, loader_threads=loader_threads,
                                     reporter=reporter)
        result.update(paper_figures(classifier, val_dir, train_dir, neighbour_train_images, reporter))
        result["checkpoint"]["sha256"] = inputs["checkpoint"].digest.removeprefix("sha256:")
        result["val"]["manifest_sha256"] = inputs["val"].digest.removeprefix("sha256:")
        result["run_record"] = run_record()  # what it ran on: in eval.json, outside the stage's key
        stage.finalize(lambda: write_json(out / "eval.json", result), started=started)
    lines = [f"eval: {result['samples']} val images, centre crop top-1/top-5 error "
             f"{result['centre']['top1_error']:.4f}/{result['centre']['top5_error']:.4f}"]
    if ten_crop:
        lines.append(f"10-crop {result['ten_crop']['top1_error']:.4f}/{result['ten_crop']['top5_error']:.4f}")
    reporter.info(", ".join(lines) + f" → {out / 'eval.json'}")
    return result


def val_manifest(val_dir: Path) -> dict:
    """The val shards' manifest; shards of another split are refused."""
    from pipeline.shards import load_manifest

    manifest = load_manifest(val_dir)
    if manifest.get("split") != "val":
        raise PipeError(f"{val_dir}: expected val shards, found split {manifest.get('split')!r} in its manifest.json")
    return manifest


def evaluate_checkpoint(classifier: Classifier, checkpoint: Path, val_dir: Path, manifest: dict, *, ten_crop: bool,
                        batch_size: int, loader: str, loader_threads: int, reporter: Reporter) -> dict:
    """The errors of `classifier` (loaded from `checkpoint`) on the val shards of `val_dir` (`manifest`); batches
    go to the device of its first tower."""
    import torch

    from pipeline.augment import make_eval_loader
    from pipeline.evaluate import confused_pairs, errors, per_class_accuracy, predict
    from stages.train import val_class_problems

    device = str(classifier.device)
    model, model_config, config, classes = (classifier.model, classifier.config, classifier.settings,
                                            classifier.classes)
    trained = config.get("classes", {}).get("trained", range(len(classes.wnids)))
    for problem in val_class_problems({"wnids": list(classes.wnids), "trained": trained}, manifest, val_dir):
        reporter.warn(problem)  # a mismatch raised; a val class never trained on is only a warning
    pca = {"mean": config["mean"], "eigvals": config["eigvals"], "eigvecs": config["eigvecs"]}
    result: dict = {"checkpoint": {"path": str(checkpoint), "step": classifier.step, "epoch": classifier.epoch},
                    "val": {"dir": str(val_dir), "split": manifest["split"]}, "model": config["model"]}
    views = {"centre": False, **({"ten_crop": True} if ten_crop else {})}
    for name, ten in views.items():
        batches = make_eval_loader(val_dir, pca, batch_size, crop=model_config.crop, ten_crop=ten,
                                   device=device, num_threads=loader_threads, loader=loader)
        with reporter.progress(f"eval {name.replace('_', '-')}", total=len(batches)) as advance:
            started = time.perf_counter()
            probs, labels = predict(model, _counting(batches, advance))
            seconds = time.perf_counter() - started
        if len(labels) != manifest["samples"]:
            raise PipeError(f"eval saw {len(labels)} samples but {val_dir} holds {manifest['samples']}")
        result[name] = {**errors(probs, labels), "images_per_s": round(len(labels) / seconds, 1)}
        if name == "centre":
            accuracy = per_class_accuracy(probs, labels)
            counts = {int(c): int((labels == c).sum()) for c in labels.unique()}
            result["per_class"] = [{"index": c, "wnid": classes.wnids[c], "name": classes.names[c],
                                    "samples": counts[c], "top1_accuracy": round(a, 6)} for c, a in
                                   sorted(accuracy.items())]
            result["confused"] = [{**pair, "true_wnid": classes.wnids[pair["true"]],
                                   "true_name": classes.names[pair["true"]],
                                   "predicted_wnid": classes.wnids[pair["predicted"]],
                                   "predicted_name": classes.names[pair["predicted"]]}
                                  for pair in confused_pairs(probs, labels)]
    result["samples"] = manifest["samples"]
    result["examples"] = [{**e, "name": classes.names[e["label"]], "top5_names": [classes.names[c] for c in e["top5"]]}
                          for e in example_predictions(model, val_dir, pca, model_config.crop, device)]
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def paper_figures(classifier: Classifier, val_dir: Path, train_dir: Path | None, limit: int | None,
                  reporter: Reporter) -> dict:
    """{"figure3": conv1's kernels and chroma per tower, "figure4": nearest training images (with train_dir)}."""
    from pipeline.figures import figure3, figure4

    model, model_config, config = classifier.model, classifier.config, classifier.settings
    figures = {"figure3": figure3(model)}
    if train_dir is not None:
        pca = {"mean": config["mean"], "eigvals": config["eigvals"], "eigvecs": config["eigvecs"]}
        figures["figure4"] = figure4(model, val_dir, train_dir, pca, model_config.crop, limit=limit)
        reporter.info(f"eval: nearest training images of {len(figures['figure4']['queries'])} val images over "
                      f"{figures['figure4']['train_images']} training images")
    return figures


def _counting(batches, advance):
    for batch in batches:
        yield batch
        advance(1)


def example_predictions(model, val_dir: Path, pca: dict, crop: int, device: str) -> list[dict]:
    """Top-5 predictions for the first val samples (for the report's image grid), via the reference transform."""
    import torch

    from pipeline.augment import reference_eval_samples

    examples = []
    for key, image, label in reference_eval_samples(val_dir, pca, crop=crop, limit=EXAMPLES):
        with torch.no_grad():
            probs = torch.softmax(model(image[None].to(device)).float(), dim=1)[0].cpu()
        top = probs.topk(5)
        examples.append({"key": key, "label": int(label), "top5": top.indices.tolist(),
                         "top5_prob": [round(p, 4) for p in top.values.tolist()]})
    return examples
