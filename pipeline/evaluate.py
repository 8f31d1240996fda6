"""Evaluation: top-1/top-5 error (the paper's measure) for the centre crop and the paper's 10-crop test.

10-crop (paper §4.1): the four corner and the centre 224 patches of the 256 square plus their mirrors; the
network's softmax outputs over the ten are averaged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.errors import PipeError
from pipeline.records import (
    CheckpointRef,
    ClassAccuracy,
    ConfusedPair,
    Errors,
    EvalResult,
    Example,
    Manifest,
    PixelStats,
    ValRef,
)
from pipeline.sources import val_class_problems

if TYPE_CHECKING:
    from pipeline.predict import Classifier


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per sample: is the label among the k highest scores (over every output, all 1,000 classes)."""
    return (scores.topk(min(k, scores.shape[1]), dim=1).indices == labels[:, None]).any(dim=1)


def errors(scores: torch.Tensor, labels: torch.Tensor, seconds: float | None = None) -> Errors:
    """Top-1 and top-5 error of `scores` (and the images a second, when it took `seconds`)."""
    n = len(labels)
    return Errors(1 - topk_correct(scores, labels, 1).sum().item() / n,
                  1 - topk_correct(scores, labels, 5).sum().item() / n, n, round(n / seconds, 1) if seconds else 0.0)


def view_probabilities(model: torch.nn.Module, images: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """Softmax over classes; a [B, V, 3, H, W] batch of V views per image gives the mean over its V softmaxes."""
    views = images.shape[1] if images.dim() == 5 else 1
    flat = images.flatten(0, 1) if images.dim() == 5 else images
    with torch.autocast(flat.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(flat)
    probs = torch.softmax(logits.float(), dim=1)
    return probs.view(len(images), views, -1).mean(dim=1)


@torch.no_grad()
def class_probabilities(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [N, C] on the CPU, labels [N]) over every batch, in order."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for images, target in batches:
        probs.append(view_probabilities(model, images, amp).cpu())
        labels.append(target.cpu())
    model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


def per_class_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    correct = topk_correct(probs, labels, 1)
    return {int(c): correct[labels == c].float().mean().item() for c in labels.unique()}


def confused_pairs(probs: torch.Tensor, labels: torch.Tensor, top: int = 10) -> list[tuple[int, int, int]]:
    """The most frequent mistakes: (true, predicted, count)."""
    predicted = probs.argmax(dim=1)
    wrong = predicted != labels
    pairs, counts = torch.stack([labels[wrong], predicted[wrong]], 1).unique(dim=0, return_counts=True)
    order = counts.argsort(descending=True, stable=True)[:top]
    return [(int(pairs[i, 0]), int(pairs[i, 1]), int(counts[i])) for i in order]


# ---------------------------------------------------------------------------------------------------------------
# a checkpoint on the val shards: what eval.json holds

EXAMPLES = 16  # val images shown with their top-5 in the report's grid
CENTRE, TEN_CROP = "centre", "ten_crop"  # the tests, as eval.json names them


def evaluate_classifier(classifier: Classifier, checkpoint: CheckpointRef, val_dir: Path, manifest: Manifest, *,
                        ten_crop: bool, batch_size: int, loader: str, loader_threads: int,
                        progress: Callable[[str, int], contextlib.AbstractContextManager[Callable[..., None]]],
                        warn: Callable[[str], None], untrained_val_classes: bool = False) -> EvalResult:
    """The errors of `classifier` on every image of the val shards in `val_dir`: centre crop (and the paper's
    10-crop), per class, the most confused pairs and the first images' top-5. Batches go to the device of its
    first tower; `progress(description, total)` is the reporter's progress bar."""
    from pipeline.augment import make_eval_loader

    device, classes = str(classifier.device), classifier.classes
    for problem in val_class_problems(classifier.spec.classes, manifest, val_dir,
                                      untrained_allowed=untrained_val_classes):
        warn(problem)  # a mismatch is refused; val classes never trained on too, unless accepted
    pixels, crop, side = classifier.spec.pixels, classifier.spec.model.crop, classifier.spec.short_side
    if manifest.params.short_side != side:
        raise PipeError(f"{val_dir}: expected val shards of short side {side} (the run's training shards'), found "
                        f"{manifest.params.short_side}; shard val with --short-side {side}")
    tests: dict[str, Errors] = {}
    per_class: tuple[ClassAccuracy, ...] = ()
    confused: tuple[ConfusedPair, ...] = ()
    for name, ten in {CENTRE: False, **({TEN_CROP: True} if ten_crop else {})}.items():
        batches = make_eval_loader(val_dir, pixels, batch_size, crop=crop, ten_crop=ten, device=device,
                                   num_threads=loader_threads, loader=loader)
        with progress(f"eval {name.replace('_', '-')}", len(batches)) as advance:
            started = time.perf_counter()
            probs, labels = class_probabilities(classifier.model, _counting(batches, advance))
            seconds = time.perf_counter() - started
        if len(labels) != manifest.samples:
            raise PipeError(f"eval saw {len(labels)} samples but {val_dir} holds {manifest.samples}")
        tests[name] = errors(probs, labels, seconds)
        if name == CENTRE:
            counts = {int(c): int((labels == c).sum()) for c in labels.unique()}
            per_class = tuple(ClassAccuracy(c, classes.wnids[c], classes.names[c], counts[c], round(a, 6))
                              for c, a in sorted(per_class_accuracy(probs, labels).items()))
            confused = tuple(ConfusedPair(true, predicted, count, classes.wnids[true], classes.names[true],
                                          classes.wnids[predicted], classes.names[predicted])
                             for true, predicted, count in confused_pairs(probs, labels))
    examples = tuple(replace(e, name=classes.names[e.label], top5_names=tuple(classes.names[c] for c in e.top5))
                     for e in example_predictions(classifier.model, val_dir, pixels, crop, device))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return EvalResult(checkpoint=checkpoint, val=ValRef(str(val_dir), manifest.split), model=classifier.spec.model,
                      centre=tests[CENTRE], ten_crop=tests.get(TEN_CROP), samples=manifest.samples,
                      per_class=per_class, confused=confused, examples=examples)


def training_subset_errors(classifier: Classifier, train_dir: Path, images: int, batch_size: int = 64) -> Errors:
    """The error on the first `images` training images in shard order (the shard stage's seeded shuffle: a fixed,
    class-mixed subset), measured as val is: eval mode, centre crop. The training side of the train–val gap; the
    error counted while training has dropout and augmentation on, which biases exactly the variants compared."""
    from pipeline.augment import reference_eval_samples
    from pipeline.figures import batched

    samples = reference_eval_samples(train_dir, classifier.spec.pixels, crop=classifier.spec.model.crop,
                                     limit=images)
    batches = ((torch.stack([s[1] for s in chunk]).to(classifier.device), torch.tensor([s[2] for s in chunk]))
               for chunk in batched(samples, batch_size))
    started = time.perf_counter()
    probs, labels = class_probabilities(classifier.model, batches)
    return errors(probs, labels, time.perf_counter() - started)


def _counting(batches, advance):
    for batch in batches:
        yield batch
        advance(1)


def example_predictions(model: torch.nn.Module, val_dir: Path, pixels: PixelStats, crop: int, device: str
                        ) -> list[Example]:
    """Top-5 predictions for the first val samples (for the report's image grid), via the reference transform."""
    from pipeline.augment import reference_eval_samples

    examples = []
    for key, image, label in reference_eval_samples(val_dir, pixels, crop=crop, limit=EXAMPLES):
        with torch.no_grad():
            probs = torch.softmax(model(image[None].to(device)).float(), dim=1)[0].cpu()
        top = probs.topk(5)
        examples.append(Example(key, int(label), tuple(top.indices.tolist()),
                                tuple(round(p, 4) for p in top.values.tolist())))
    return examples
