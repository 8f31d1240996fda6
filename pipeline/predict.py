"""Classify one's own images with a trained checkpoint: the paper's test procedure (§4.1), top-k classes.

No third copy of the preprocessing: an image goes through the shard stage's `prepare_image` (sniff the real format,
repair to RGB, the run's short side, the shard's baseline JPEG) and then the eval path's crops (`centre_crop_box` /
`ten_crop_boxes`, `reference_patch`) minus the checkpoint's mean. The JPEG round trip is kept on purpose: a photo
then reaches the network exactly as a val image does through its shard, so `predict` and `eval` agree to the bit.
Crop, width, LRN convention and mean all come from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.augment.geometry import centre_crop_box, ten_crop_boxes
from pipeline.augment.reference import decode_rgb, reference_patch
from pipeline.cluster import resolve_devices
from pipeline.errors import PipeError
from pipeline.evaluate import view_probabilities
from pipeline.images import BadImage, prepare_image
from pipeline.model import AlexNet, build_model
from pipeline.records import ClassProbability, Prediction, RunSpec
from pipeline.sources import IMAGE_SUFFIXES, ClassTable, class_table


@dataclass
class Classifier:
    """A checkpoint's model in eval mode, with what its inputs and outputs mean (its run's spec)."""

    model: AlexNet
    spec: RunSpec
    step: int
    epoch: int

    @property
    def device(self) -> torch.device:
        return self.model.devices[0]

    @property
    def classes(self) -> ClassTable:
        return class_table(self.spec.classes)

    @property
    def mean(self) -> tuple[float, ...]:
        """The training set's per-channel RGB mean in [0, 1] units (pca.json's), subtracted ×255 (§2)."""
        return self.spec.pixels.mean


def load_classifier(checkpoint: Path, devices: str | Sequence[str] = "cpu") -> Classifier:
    """The model of `checkpoint` on `devices` (a --devices spec or a resolved list), in eval mode."""
    from pipeline.train.checkpoints import load_checkpoint, non_finite_tensors

    saved = load_checkpoint(checkpoint)
    spec, step, epoch, weights = saved.spec, saved.step, saved.epoch, saved.model
    bad = non_finite_tensors(weights)
    if bad:
        raise PipeError(f"{checkpoint}: expected finite weights, found {len(bad)} tensor(s) with nan or inf (first: "
                        f"{bad[0]}); the run that wrote it diverged")
    device_list = (resolve_devices(devices) if isinstance(devices, str) else list(devices))[:spec.model.towers]
    model = build_model(spec.model, device_list)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise PipeError(f"{checkpoint}: expected weights matching its recorded settings, found others "
                        f"({str(e).splitlines()[0]})") from None
    return Classifier(model.eval(), spec, step, epoch)


def image_views(data: bytes, mean: Sequence[float], crop: int, ten_crop: bool, short_side: int) -> torch.Tensor:
    """The network's input for one image file's bytes, resized as the run's shards were: [3, crop, crop] (centre)
    or [10, 3, crop, crop] (the 10 views in `TEN_CROP_VIEWS` order). Raises `BadImage` for bytes the shard stage
    would skip."""
    image = decode_rgb(prepare_image(data, short_side=short_side).jpeg)
    width, height = image.shape[2], image.shape[1]
    pixel_mean = 255.0 * torch.tensor(mean, dtype=torch.float64)
    if ten_crop:
        return torch.stack([reference_patch(image, box[0], box[1], crop, mirrored, pixel_mean)
                            for box, mirrored in ten_crop_boxes(width, height, crop)])
    box = centre_crop_box(width, height, crop)
    return reference_patch(image, box[0], box[1], crop, False, pixel_mean)


def image_files(paths: Sequence[Path]) -> Iterator[tuple[Path, str | None]]:
    """(path, None) for each file named and each image file (by suffix, as the shard stage lists) under each
    folder named, sorted; (path, reason) for a path that does not exist or a folder without images."""
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                yield path, f"no {'/'.join(IMAGE_SUFFIXES)} files in this folder"
            yield from ((p, None) for p in found)
        elif path.is_file():
            yield path, None
        else:
            yield path, "no such file or folder"


def classify(classifier: Classifier, paths: Sequence[Path], *, top: int = 5, ten_crop: bool = False,
             batch_size: int = 32) -> Iterator[Prediction]:
    """One prediction per image, in order: its top classes or, for a file that cannot be read, why. Images go
    through the network `batch_size` at a time."""
    pending: list[tuple[Path, torch.Tensor | str]] = []  # an image's views, or why it could not be read

    def flush() -> Iterator[Prediction]:
        images = [views for _, views in pending if isinstance(views, torch.Tensor)]
        best = None
        if images:
            with torch.no_grad():
                probs = view_probabilities(classifier.model, torch.stack(images).to(classifier.device)).cpu()
            best = iter(zip(*probs.topk(min(top, probs.shape[1]), dim=1), strict=True))
        for path, views in pending:
            if isinstance(views, str):
                yield Prediction(str(path), error=views)
                continue
            assert best is not None  # a tensor of views: `images` was not empty
            values, indices = next(best)
            names, wnids = classifier.classes.names, classifier.classes.wnids
            yield Prediction(str(path), tuple(ClassProbability(i, wnids[i], names[i], round(p, 6))
                                              for i, p in zip(indices.tolist(), values.tolist(), strict=True)))
        pending.clear()

    readable = 0
    for path, problem in image_files(paths):
        if problem is None:
            try:
                pending.append((path, image_views(path.read_bytes(), classifier.mean, classifier.spec.model.crop,
                                                  ten_crop, classifier.spec.short_side)))
                readable += 1
            except (BadImage, OSError) as e:
                problem = str(e)
        if problem is not None:
            pending.append((path, problem))
        if readable == batch_size:
            yield from flush()
            readable = 0
    if pending:
        yield from flush()
