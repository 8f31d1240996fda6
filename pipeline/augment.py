"""Augmentation (paper §2, §4.1): the training crops, mirrors and PCA lighting, and the test-time centre crop and
10-crop, as NVIDIA DALI pipelines; the same transforms in plain torch as the reference path.

Every image in a shard has short side 256 (aspect kept). The paper's recipe, in its order:

- the central `side`×`side` square, `side` = the short side (256): `centre_square`;
- train: a uniformly random `crop`×`crop` patch inside it (every integer offset 0..side−crop equally likely), mirrored
  with p=0.5, plus the lighting offset `255 · eigvecs @ (α ⊙ eigvals)`, α ~ N(0, 0.1)³ drawn each time an image is
  used (`lighting_offset`); test: the centre patch (`centre_crop_box`), or the 10 patches of `ten_crop_boxes`;
- minus the training mean, `255 · pca.json mean` per channel (§2; no division by std: the paper has none).

In DALI the lighting is folded into `crop_mirror_normalize` as a per-image mean: `255·mean − offset`.

Outputs are plain torch tensors on the loader's device: images float32 [B, 3, H, W] (channels-last strides when asked;
10-crop: [B, 10, 3, H, W], views in `TEN_CROP_VIEWS` order) and labels int64 [B]. On the CPU an image batch shares
DALI's output buffer (no copy); on a GPU it is one device-to-device copy.

Epochs are exact: each epoch the shard file order is permuted by (seed, epoch); rank r of W reads samples
[⌊rN/W⌋, ⌊(r+1)N/W⌋) of that order (DALI's own split), and every rank yields ⌊N / (B·W)⌋ batches of B, so no sample is
seen twice and the last partial global batch is dropped on every rank. The DALI pipeline is rebuilt each epoch with
its seed derived from (seed, epoch, rank), so an epoch's batches are a function of those three numbers: a resumed
epoch runs the consumed batches through the pipeline again (their loading time, not their training time) and yields
the remaining ones exactly as an uninterrupted run would. Evaluation reads every sample exactly once (the padded last
batch is trimmed).

The reference path (`ReferenceTrainLoader`, `ReferenceEvalLoader`: Pillow decode + torch ops in a DataLoader with
workers) reads the same samples by the byte ranges in the shards' DALI index files, with the same rank split and
exact epochs. It is the parity oracle for tests, the baseline for `bench/loader.py`, and `--loader torch`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.errors import PipeError
from pipeline.shards import load_manifest, shard_paths

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    DALI_IMPORT_ERROR: str | None = None
except ImportError as e:  # the torch reference path works without DALI
    DALI_IMPORT_ERROR = str(e)

    def pipeline_def(function):
        return function

LIGHTING_ALPHA_STD = 0.1  # §4.1: "Gaussian with mean zero and standard deviation 0.1"
TEN_CROP_VIEWS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre",
                  "top-left mirrored", "top-right mirrored", "bottom-left mirrored", "bottom-right mirrored",
                  "centre mirrored")
PCA_FIELDS = ("pixel_scale", "pixels", "images", "mean", "std", "cov", "eigvals", "eigvecs", "source_manifest_sha256")
READER = "Reader"
_SHARD_ORDER, _PIPELINE, _REFERENCE = 1, 2, 3  # seed-stream tags, so (seed, epoch[, rank]) streams never coincide

Batch = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# pca.json


def load_pca(path: Path) -> dict:
    """The fields of `pca.json` (written by pca-stats), checked: mean/std/eigvals [3], cov/eigvecs [3][3]."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipeError(f"{path}: no such file (expected pca.json from `alexnet-pipe pca-stats`)") from None
    except (OSError, ValueError) as e:
        raise PipeError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(data, dict):
        raise PipeError(f"{path}: expected a JSON object with fields {', '.join(PCA_FIELDS)}")
    missing = [k for k in PCA_FIELDS if k not in data]
    if missing:
        raise PipeError(f"{path}: missing field(s) {', '.join(missing)} (expected pca.json from pca-stats)")
    if data["pixel_scale"] != "0-1":
        raise PipeError(f"{path}: pixel_scale {data['pixel_scale']!r}, expected '0-1'")
    for name, shape in (("mean", (3,)), ("std", (3,)), ("eigvals", (3,)), ("cov", (3, 3)), ("eigvecs", (3, 3))):
        try:
            value = np.asarray(data[name], dtype=np.float64)
        except (TypeError, ValueError):
            value = None
        if value is None or value.shape != shape or not np.isfinite(value).all():
            raise PipeError(f"{path}: field {name} must be {'×'.join(map(str, shape))} finite numbers, "
                            f"found {data[name]!r}")
    if list(data["eigvals"]) != sorted(data["eigvals"], reverse=True):
        raise PipeError(f"{path}: eigvals must be in descending order, found {data['eigvals']}")
    return {k: data[k] for k in PCA_FIELDS}


# ---------------------------------------------------------------------------------------------------------------
# the math, shared by both paths (pure functions)


def centre_square(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the image's central square; side = the short side (256 in our shards)."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def centre_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre `crop` patch of the central square (test time, §4.1)."""
    left, top, side = centre_square(width, height)
    inset = (side - crop) // 2
    return left + inset, top + inset, left + inset + crop, top + inset + crop


def ten_crop_boxes(width: int, height: int, crop: int) -> list[tuple[tuple[int, int, int, int], bool]]:
    """The paper's 10 test patches as ((left, top, right, bottom), mirrored), in `TEN_CROP_VIEWS` order: the four
    corner patches and the centre patch of the central square, then the same five mirrored."""
    left, top, side = centre_square(width, height)
    far, mid = side - crop, (side - crop) // 2
    boxes = [(left + dx, top + dy, left + dx + crop, top + dy + crop)
             for dx, dy in ((0, 0), (far, 0), (0, far), (far, far), (mid, mid))]
    return [(b, False) for b in boxes] + [(b, True) for b in boxes]


def lighting_matrix(eigvals: Sequence[float], eigvecs: Sequence[Sequence[float]]) -> np.ndarray:
    """M with M @ α = the lighting offset: 255 · eigvecs · diag(eigvals) (eigvecs' columns are the eigenvectors)."""
    return 255.0 * np.asarray(eigvecs, dtype=np.float64) * np.asarray(eigvals, dtype=np.float64)[None, :]


def lighting_offset(alpha, eigvals, eigvecs):
    """§4.1: add `[p1, p2, p3][α1λ1, α2λ2, α3λ3]ᵀ` to every RGB pixel, here on the 0–255 scale. Returns a [3] array of
    alpha's kind (numpy or torch)."""
    if isinstance(alpha, torch.Tensor):
        m = torch.as_tensor(lighting_matrix(eigvals, eigvecs), dtype=alpha.dtype, device=alpha.device)
        return m @ alpha
    return lighting_matrix(eigvals, eigvecs) @ np.asarray(alpha, dtype=np.float64)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from a tuple of non-negative integers (seed, epoch, rank, …); never from global state."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]) & 0x7FFFFFFF


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard files' order in `epoch` (the same on every rank): DALI's reader only shuffles within a buffer."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, _SHARD_ORDER])).permutation(num_shards).tolist()


def rank_range(samples: int, rank: int, world_size: int) -> range:
    """Positions of the samples rank `rank` reads: DALI's reader split (`start_index` = ⌊size·id/shards⌋)."""
    return range(samples * rank // world_size, samples * (rank + 1) // world_size)


def batches_per_epoch(samples: int, batch_size: int, world_size: int) -> int:
    """Training: the last partial global batch is dropped on every rank."""
    return samples // (batch_size * world_size)


# ---------------------------------------------------------------------------------------------------------------
# shard sets


@dataclass(frozen=True)
class ShardSet:
    """What a loader needs to know about a shard folder (from its manifest)."""

    dir: Path
    tars: tuple[str, ...]
    indexes: tuple[str, ...]
    counts: tuple[int, ...]
    num_classes: int
    short_side: int

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def label_digits(self) -> int:
        return len(str(max(self.num_classes - 1, 0)))

    @classmethod
    def open(cls, shard_dir: Path) -> ShardSet:
        shard_dir = Path(shard_dir)
        manifest = load_manifest(shard_dir)
        pairs = shard_paths(shard_dir)
        missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise PipeError(f"{shard_dir}: shard files listed in manifest.json are missing: {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if not pairs or manifest["samples"] == 0:
            raise PipeError(f"{shard_dir}: the manifest lists no samples")
        return cls(shard_dir, tuple(str(t) for t, _ in pairs), tuple(str(i) for _, i in pairs),
                   tuple(s["samples"] for s in manifest["shards"]), int(manifest.get("num_classes_total", 1000)),
                   int(manifest.get("params", {}).get("short_side", 256)))

    def check_crop(self, crop: int) -> None:
        if not 1 <= crop <= self.short_side:
            raise PipeError(f"crop {crop} does not fit the {self.short_side}-pixel short side of {self.dir}")


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise PipeError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world_size")
    if batch_size < 1:
        raise PipeError(f"batch size must be at least 1, got {batch_size}")


# ---------------------------------------------------------------------------------------------------------------
# DALI pipelines (one @pipeline_def each; its arguments are the only knobs)


def _read(paths, index_paths, shard_id, num_shards, label_digits, *, shuffle, initial_fill=1024,
          pad_last_batch=False):
    """(jpegs, labels) of this rank's part of the shards."""
    jpegs, cls = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "cls"], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle, initial_fill=initial_fill,
        pad_last_batch=pad_last_batch, stick_to_shard=True, name=READER)
    return jpegs, _parse_label(cls, label_digits)


def _parse_label(cls, digits: int):
    """`cls` holds the label as 1..`digits` ASCII digits, so samples have uneven shapes. Pad the digit values with
    zeros on the right to `digits`, read that as a number, and divide away the padding: 10^(digits − length).
    A label longer than `digits` comes out as −1 (the loader then stops with an error)."""
    length = cls.shape(dtype=types.INT64)[0]
    padded = fn.pad(fn.cast(cls, dtype=types.INT64) - 48, axes=[0], shape=[digits], fill_value=0)
    number = padded[0]
    for i in range(1, digits):
        number = number * 10 + padded[i]
    too_long = length > digits
    label = number // dmath.pow(10, dmath.max(digits - length, 0))
    return label * (1 - too_long) - too_long


def _square(jpegs):
    """(height, width, side, left, top) of each image's central square, read from the JPEG header."""
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # HWC
    height, width = shape[0], shape[1]
    side = dmath.min(height, width)
    return height, width, side, (width - side) // 2, (height - side) // 2


def _decode(jpegs, device: str):
    # Orientation tags are ignored, as by Pillow and by the shard stage; fancy upsampling matches libjpeg-turbo.
    return fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                             adjust_orientation=False, jpeg_fancy_upsampling=True)


def _patch(images, height, width, x, y, crop: int, device: str, mirror=0, mean=(0.0, 0.0, 0.0),
           layout: str = "CHW"):
    """The crop×crop patch whose top-left pixel is (x, y), mirrored if asked, minus `mean`, float32.

    crop_mirror_normalize takes a relative position p and starts at round(p · (W − crop)); p = x / (W − crop)
    lands on x exactly (the float error is far below ½). W = crop leaves one place, x = 0 (hence the max)."""
    pos_x, pos_y = x / dmath.max(width - crop, 1), y / dmath.max(height - crop, 1)
    return fn.crop_mirror_normalize(images, device=device, crop=(crop, crop), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                    mirror=mirror, mean=mean, std=[1.0, 1.0, 1.0], dtype=types.FLOAT,
                                    output_layout=layout)


@pipeline_def
def train_pipeline(paths, index_paths, *, mean, eigvals, eigvecs, shard_id=0, num_shards=1, initial_fill=1024,
                   crop=224, label_digits=3, lighting_alpha_std=LIGHTING_ALPHA_STD, random_crop=True, mirror=True,
                   lighting=True, device="cpu", channels_last=False, with_params=False):
    """Training: random crop of the central square, mirror p=0.5, PCA lighting, minus the mean (§4.1).

    Outputs (images [crop, crop] CHW or HWC, labels); with `with_params` also the decoded originals, the crop's
    top-left corner x and y, the mirror flag and the lighting offset [3] (for the preview and tests)."""
    jpegs, labels = _read(paths, index_paths, shard_id, num_shards, label_digits, shuffle=True,
                          initial_fill=initial_fill)
    height, width, side, left, top = _square(jpegs)
    room = side - crop
    if random_crop:  # floor(u · (room + 1)), u ∈ [0, 1): each integer offset 0..room equally likely
        dx = dmath.min(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (room + 1)), room)
        dy = dmath.min(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (room + 1)), room)
    else:
        dx = dy = room // 2
    flip = fn.random.coin_flip(probability=0.5 if mirror else 0.0)
    alpha = fn.random.normal(shape=[1, 3], stddev=lighting_alpha_std if lighting else 0.0)  # one 3-d point
    light = lighting_matrix(eigvals, eigvecs)
    pixel_mean = fn.reshape(fn.coord_transform(alpha, M=(-light).ravel().tolist(),
                                               T=(255.0 * np.asarray(mean)).tolist()), shape=[3])
    images = _decode(jpegs, device)
    x, y = left + dx, top + dy
    out = _patch(images, height, width, x, y, crop, device, mirror=flip, mean=pixel_mean,
                 layout="HWC" if channels_last else "CHW")
    if not with_params:
        return out, labels
    offset = fn.reshape(fn.coord_transform(alpha, M=light.ravel().tolist()), shape=[3])
    return out, labels, images, fn.cast(x, dtype=types.INT64), fn.cast(y, dtype=types.INT64), flip, offset


@pipeline_def
def val_pipeline(paths, index_paths, *, mean, shard_id=0, num_shards=1, crop=224, label_digits=3, device="cpu"):
    """Test: the centre crop×crop patch of the central square, minus the mean; no randomness."""
    jpegs, labels = _read(paths, index_paths, shard_id, num_shards, label_digits, shuffle=False, pad_last_batch=True)
    height, width, side, left, top = _square(jpegs)
    inset = (side - crop) // 2
    return _patch(_decode(jpegs, device), height, width, left + inset, top + inset, crop, device,
                  mean=(255.0 * np.asarray(mean)).tolist()), labels


@pipeline_def
def ten_crop_pipeline(paths, index_paths, *, mean, shard_id=0, num_shards=1, crop=224, label_digits=3,
                      device="cpu"):
    """The paper's 10-crop test (§4.1): the four corner and the centre patches of the central square and their
    mirrors, stacked per image as [10, 3, crop, crop] in `TEN_CROP_VIEWS` order."""
    jpegs, labels = _read(paths, index_paths, shard_id, num_shards, label_digits, shuffle=False, pad_last_batch=True)
    height, width, side, left, top = _square(jpegs)
    images = _decode(jpegs, device)
    far = side - crop
    mid = far // 2
    mean = (255.0 * np.asarray(mean)).tolist()
    corners = ((0, 0), (far, 0), (0, far), (far, far), (mid, mid))
    views = [_patch(images, height, width, left + dx, top + dy, crop, device, mirror=flip, mean=mean)
             for flip in (0, 1) for dx, dy in corners]
    return fn.stack(*views, axis=0), labels


# ---------------------------------------------------------------------------------------------------------------
# the loaders the trainer and evaluator see: plain torch tensors


def _torch_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise PipeError(f"loader device must be cpu or cuda[:N], got {device}")
    return device


def _require_dali() -> None:
    if DALI_IMPORT_ERROR is not None:
        raise PipeError(f"NVIDIA DALI is not importable ({DALI_IMPORT_ERROR}); install nvidia-dali-cuda130, "
                        "or use --loader torch (the reference path)")


def _dali_to_torch(batch, device: torch.device) -> torch.Tensor:
    """A DALI output batch as a torch tensor on `device`. On the CPU: no copy, the tensor shares DALI's buffer (the
    dynamic executor allocates outputs per iteration and keeps a buffer alive while the DLPack capsule holds it).
    On a GPU: one device copy on torch's current stream."""
    dense = batch.as_tensor()
    if device.type == "cpu":
        return torch.from_dlpack(dense)
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    return feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))


def _run(pipe, device: torch.device) -> tuple:
    """One DALI iteration. On a GPU its outputs are ordered on torch's current stream instead of being
    host-synchronous: the host copy would otherwise wait for the training step already queued on that stream, and
    the trainer's data-wait figure would measure compute."""
    return pipe.run(torch.cuda.current_stream(device)) if device.type == "cuda" else pipe.run()


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`, without making the host wait for the GPU (pinned memory, non-blocking copy)."""
    if device.type == "cpu":
        return tensor
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def _checked_labels(labels: torch.Tensor, num_classes: int, shard_dir: Path) -> torch.Tensor:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise PipeError(f"{shard_dir}: a sample's cls is not a label in 0..{num_classes - 1} (parsed {bad}); "
                        "the shards are damaged or from another class list")
    return labels


class _TrainEpochs:
    """Where a training loader stands: the epoch and the batches consumed in it (the same on every rank)."""

    shards: ShardSet
    batch_size: int
    world_size: int
    epoch: int = 0
    _resume_at: int = 0  # batches the next iteration skips
    _position: int = 0  # batches handed out in this epoch

    def __len__(self) -> int:
        return batches_per_epoch(self.shards.samples, self.batch_size, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._resume_at, self._position = epoch, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self._position}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["batches"] <= len(self):
            raise PipeError(f"loader state {state} does not fit an epoch of {len(self)} batches")
        self.epoch, self._resume_at, self._position = state["epoch"], state["batches"], state["batches"]

    def _check_not_empty(self) -> None:
        if len(self) == 0:
            raise PipeError(f"{self.shards.dir} holds {self.shards.samples} samples, fewer than one global batch "
                            f"({self.batch_size} × {self.world_size} ranks)")


class TrainLoader(_TrainEpochs):
    """The training batches of one rank: (images float32 [B, 3, crop, crop] on `device`, labels int64 [B]).

    `set_epoch(e)` before iterating; `len()` batches per epoch, the same on every rank. `state_dict()` after a batch
    is {"epoch", "batches" consumed}; `load_state_dict` of it makes the next iteration yield exactly the batches an
    uninterrupted run would have yielded next (the consumed ones are replayed through the pipeline, not returned).
    """

    def __init__(self, shard_dir: Path, pca: dict, batch_size: int, *, crop: int = 224, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", num_threads: int = 2,
                 lighting: bool = True, mirror: bool = True, random_crop: bool = True, channels_last: bool = False,
                 lighting_alpha_std: float = LIGHTING_ALPHA_STD, initial_fill: int = 1024, prefetch: int = 2):
        _require_dali()
        _check_rank(rank, world_size, batch_size)
        if seed < 0:
            raise PipeError(f"seed must be non-negative, got {seed}")
        self.shards = ShardSet.open(shard_dir)
        self.shards.check_crop(crop)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = _torch_device(device)
        self.num_threads, self.prefetch = num_threads, prefetch
        self.channels_last = channels_last
        self.options = {"crop": crop, "label_digits": self.shards.label_digits, "mean": list(pca["mean"]),
                        "eigvals": list(pca["eigvals"]), "eigvecs": [list(r) for r in pca["eigvecs"]],
                        "lighting_alpha_std": lighting_alpha_std, "random_crop": random_crop, "mirror": mirror,
                        "lighting": lighting, "channels_last": channels_last,
                        "device": "gpu" if self.device.type == "cuda" else "cpu"}
        self.rank_samples = len(rank_range(self.shards.samples, rank, world_size))
        self.initial_fill = max(1, min(initial_fill, self.rank_samples))
        self._check_not_empty()

    def pipeline(self, epoch: int, *, with_params: bool = False, batch_size: int | None = None):
        """The built DALI pipeline of `epoch` on this rank (shard files permuted by (seed, epoch), pipeline seed
        from (seed, epoch, rank))."""
        order = epoch_shard_order(len(self.shards.tars), self.seed, epoch)
        pipe = train_pipeline([self.shards.tars[i] for i in order], [self.shards.indexes[i] for i in order],
                              shard_id=self.rank, num_shards=self.world_size, initial_fill=self.initial_fill,
                              with_params=with_params, **self.options,
                              batch_size=batch_size or self.batch_size, num_threads=self.num_threads,
                              device_id=self.device.index if self.device.type == "cuda" else None,
                              seed=derive_seed(self.seed, epoch, self.rank, _PIPELINE),
                              prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[Batch]:
        start, self._resume_at = self._resume_at, 0
        pipe = self.pipeline(self.epoch)
        try:
            for i in range(len(self)):
                images, labels = _run(pipe, self.device)
                if i < start:
                    continue
                images = _dali_to_torch(images, self.device)
                if self.channels_last:  # HWC from DALI: a [B, 3, H, W] view with channels-last strides
                    images = images.permute(0, 3, 1, 2)
                labels = _checked_labels(_dali_to_torch(labels, torch.device("cpu")), self.shards.num_classes,
                                         self.shards.dir)
                self._position = i + 1
                yield images, _to_device(labels, self.device)
        finally:
            del pipe


class EvalLoader:
    """Every sample of this rank's part of the shards exactly once, in shard order: (images float32 [B, 3, crop,
    crop], or [B, 10, 3, crop, crop] with `ten_crop`, labels int64 [B]); the last batch may be smaller."""

    def __init__(self, shard_dir: Path, pca: dict, batch_size: int, *, crop: int = 224, ten_crop: bool = False,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", num_threads: int = 2,
                 prefetch: int = 2):
        _require_dali()
        _check_rank(rank, world_size, batch_size)
        self.shards = ShardSet.open(shard_dir)
        self.shards.check_crop(crop)
        self.batch_size, self.rank, self.world_size, self.ten_crop = batch_size, rank, world_size, ten_crop
        self.device = _torch_device(device)
        self.num_threads, self.prefetch = num_threads, prefetch
        self.options = {"crop": crop, "label_digits": self.shards.label_digits, "mean": list(pca["mean"]),
                        "device": "gpu" if self.device.type == "cuda" else "cpu"}
        self.samples = len(rank_range(self.shards.samples, rank, world_size))

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size)

    def pipeline(self):
        make = ten_crop_pipeline if self.ten_crop else val_pipeline
        pipe = make(list(self.shards.tars), list(self.shards.indexes), shard_id=self.rank,
                    num_shards=self.world_size, **self.options, batch_size=self.batch_size,
                    num_threads=self.num_threads, device_id=self.device.index if self.device.type == "cuda" else None,
                    seed=0, prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[Batch]:
        if not self.samples:  # more ranks than samples: nothing for this one
            return
        pipe = self.pipeline()
        try:
            for i in range(len(self)):
                images, labels = _run(pipe, self.device)
                keep = min(self.batch_size, self.samples - i * self.batch_size)  # the reader pads the last batch
                labels = _checked_labels(_dali_to_torch(labels, torch.device("cpu"))[:keep],
                                         self.shards.num_classes, self.shards.dir)
                yield _dali_to_torch(images, self.device)[:keep], _to_device(labels, self.device)
        finally:
            del pipe


# ---------------------------------------------------------------------------------------------------------------
# the reference path: Pillow + torch in a DataLoader with workers


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's components lie in its shard: (offset, size) byte ranges from the DALI index."""

    tar: str
    key: str
    jpg: tuple[int, int]
    cls: tuple[int, int]


def shard_samples(shards: ShardSet) -> list[SampleRef]:
    """Every sample in DALI's reading order (shards in manifest order, samples in index order)."""
    refs = []
    for tar, index in zip(shards.tars, shards.indexes, strict=True):
        lines = Path(index).read_text().splitlines()
        for line in lines[1:]:
            fields = line.split()
            parts = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                     for i in range(0, len(fields), 4)}
            if "jpg" not in parts or "cls" not in parts:
                raise PipeError(f"{index}: a sample without jpg or cls: {line!r}")
            refs.append(SampleRef(tar, parts["jpg"][2].removesuffix(".jpg"), parts["jpg"][:2], parts["cls"][:2]))
    if len(refs) != shards.samples:
        raise PipeError(f"{shards.dir}: the index files list {len(refs)} samples, the manifest {shards.samples}")
    return refs


class _ByteReader:
    """pread of byte ranges; one descriptor per file and process (DataLoader workers fork)."""

    def __init__(self):
        self._fds: dict[tuple[int, str], int] = {}

    def read(self, path: str, span: tuple[int, int]) -> bytes:
        key = (os.getpid(), path)
        if key not in self._fds:
            self._fds[key] = os.open(path, os.O_RDONLY)
        return os.pread(self._fds[key], span[1], span[0])

    def __del__(self):
        for (pid, _), fd in self._fds.items():
            if pid == os.getpid():
                os.close(fd)


def decode_rgb(jpeg: bytes) -> torch.Tensor:
    """uint8 [3, H, W] via Pillow (orientation tags ignored, as by DALI here and by the shard stage)."""
    with Image.open(io.BytesIO(jpeg)) as img:
        array = np.array(img.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)


def reference_patch(image: torch.Tensor, left: int, top: int, crop: int, mirror: bool,
                    pixel_mean: torch.Tensor) -> torch.Tensor:
    """The crop×crop patch at (left, top) of a uint8 [3, H, W] image, mirrored if asked, minus pixel_mean [3]."""
    patch = image[:, top:top + crop, left:left + crop]
    if mirror:
        patch = patch.flip(-1)
    return patch.float() - pixel_mean.float()[:, None, None]


def draw_train_params(generator: torch.Generator, side: int, crop: int, *, random_crop: bool = True,
                      mirror: bool = True, lighting: bool = True,
                      lighting_alpha_std: float = LIGHTING_ALPHA_STD) -> tuple[int, int, bool, torch.Tensor]:
    """(dx, dy, mirrored, α [3]): the crop offset inside the central square, the flip and the lighting draw."""
    room = side - crop
    dx, dy = torch.randint(0, room + 1, (2,), generator=generator).tolist() if random_crop else (room // 2,) * 2
    flip = bool(torch.rand((), generator=generator) < 0.5) and mirror
    alpha = torch.randn(3, generator=generator, dtype=torch.float64) * (lighting_alpha_std if lighting else 0.0)
    return dx, dy, flip, alpha


class _ReferenceTrainSet(torch.utils.data.Dataset):
    """Item (sample index, position in this rank's epoch) → (augmented image, label). The augmentation draw is
    seeded by (seed, epoch, rank, position), so it does not depend on which worker makes the item."""

    def __init__(self, refs: list[SampleRef], pca: dict, crop: int, seed: int, epoch: int, rank: int,
                 options: dict):
        self.refs, self.crop, self.seed, self.epoch, self.rank, self.options = refs, crop, seed, epoch, rank, options
        self.mean = 255.0 * torch.tensor(pca["mean"], dtype=torch.float64)
        self.light = torch.from_numpy(lighting_matrix(pca["eigvals"], pca["eigvecs"]))
        self.bytes = _ByteReader()

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        patch, label, *_ = self.augment(*item)
        return patch, label

    def augment(self, index: int, position: int):
        """(patch, label, original uint8 [3, H, W], (left, top) of the crop, mirrored, lighting offset [3])."""
        ref = self.refs[index]
        image = decode_rgb(self.bytes.read(ref.tar, ref.jpg))
        left, top, side = centre_square(image.shape[2], image.shape[1])
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, position, _REFERENCE))
        dx, dy, flip, alpha = draw_train_params(generator, side, self.crop, **self.options)
        offset = self.light @ alpha
        patch = reference_patch(image, left + dx, top + dy, self.crop, flip, self.mean - offset)
        return patch, int(self.bytes.read(ref.tar, ref.cls)), image, (left + dx, top + dy), flip, offset


class _ReferenceEvalSet(torch.utils.data.Dataset):
    def __init__(self, refs: list[SampleRef], pca: dict, crop: int, ten_crop: bool):
        self.refs, self.crop, self.ten_crop = refs, crop, ten_crop
        self.mean = 255.0 * torch.tensor(pca["mean"], dtype=torch.float64)
        self.bytes = _ByteReader()

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        ref = self.refs[index]
        image = decode_rgb(self.bytes.read(ref.tar, ref.jpg))
        width, height = image.shape[2], image.shape[1]
        if self.ten_crop:
            out = torch.stack([reference_patch(image, box[0], box[1], self.crop, flip, self.mean)
                               for box, flip in ten_crop_boxes(width, height, self.crop)])
        else:
            box = centre_crop_box(width, height, self.crop)
            out = reference_patch(image, box[0], box[1], self.crop, False, self.mean)
        return out, int(self.bytes.read(ref.tar, ref.cls))


def _data_loader(dataset, batches: list, num_workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       pin_memory=device.type == "cuda",
                                       prefetch_factor=4 if num_workers else None)


class ReferenceTrainLoader(_TrainEpochs):
    """`TrainLoader`'s contract in plain torch: the same rank split, exact epochs, batch count and resume; within a
    rank's part the order is a full permutation seeded by (seed, epoch, rank). `num_threads` DataLoader workers."""

    def __init__(self, shard_dir: Path, pca: dict, batch_size: int, *, crop: int = 224, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", num_threads: int = 2,
                 lighting: bool = True, mirror: bool = True, random_crop: bool = True, channels_last: bool = False,
                 lighting_alpha_std: float = LIGHTING_ALPHA_STD):
        _check_rank(rank, world_size, batch_size)
        if seed < 0:
            raise PipeError(f"seed must be non-negative, got {seed}")
        self.shards = ShardSet.open(shard_dir)
        self.shards.check_crop(crop)
        self.refs = shard_samples(self.shards)
        self.pca, self.crop, self.batch_size, self.seed = pca, crop, batch_size, seed
        self.rank, self.world_size, self.num_threads = rank, world_size, num_threads
        self.device, self.channels_last = _torch_device(device), channels_last
        self.options = {"random_crop": random_crop, "mirror": mirror, "lighting": lighting,
                        "lighting_alpha_std": lighting_alpha_std}
        self._check_not_empty()

    def epoch_samples(self, epoch: int) -> list[int]:
        """Sample indices this rank trains on in `epoch`, in order (len(self) × batch_size of them)."""
        starts = np.cumsum((0, *self.shards.counts))
        order = [starts[s] + j for s in epoch_shard_order(len(self.shards.tars), self.seed, epoch)
                 for j in range(self.shards.counts[s])]
        mine = [order[p] for p in rank_range(len(order), self.rank, self.world_size)]
        permutation = torch.randperm(len(mine), generator=torch.Generator().manual_seed(
            derive_seed(self.seed, epoch, self.rank, _SHARD_ORDER, _REFERENCE)))
        return [int(mine[p]) for p in permutation[:len(self) * self.batch_size]]

    def dataset(self, epoch: int) -> _ReferenceTrainSet:
        """Item (sample index, position in `epoch`) → (augmented image, label)."""
        return _ReferenceTrainSet(self.refs, self.pca, self.crop, self.seed, epoch, self.rank, self.options)

    def __iter__(self) -> Iterator[Batch]:
        start, self._resume_at = self._resume_at, 0
        order, b = self.epoch_samples(self.epoch), self.batch_size
        batches = [[(order[p], p) for p in range(i * b, (i + 1) * b)] for i in range(start, len(self))]
        dataset = self.dataset(self.epoch)
        for i, (images, labels) in enumerate(_data_loader(dataset, batches, self.num_threads, self.device), start):
            images = _to_device(images, self.device)
            if self.channels_last:  # after the copy: a layout change of a pinned batch would be a pageable copy
                images = images.contiguous(memory_format=torch.channels_last)
            self._position = i + 1
            yield images, _to_device(_checked_labels(labels, self.shards.num_classes, self.shards.dir), self.device)


class ReferenceEvalLoader:
    """`EvalLoader`'s contract in plain torch: this rank's part of the shards in order, each sample once."""

    def __init__(self, shard_dir: Path, pca: dict, batch_size: int, *, crop: int = 224, ten_crop: bool = False,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", num_threads: int = 2):
        _check_rank(rank, world_size, batch_size)
        self.shards = ShardSet.open(shard_dir)
        self.shards.check_crop(crop)
        self.refs = shard_samples(self.shards)
        self.pca, self.crop, self.ten_crop, self.batch_size = pca, crop, ten_crop, batch_size
        self.device, self.num_threads = _torch_device(device), num_threads
        self.indices = list(rank_range(self.shards.samples, rank, world_size))
        self.samples = len(self.indices)

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        b = self.batch_size
        batches = [self.indices[i:i + b] for i in range(0, self.samples, b)]
        dataset = _ReferenceEvalSet(self.refs, self.pca, self.crop, self.ten_crop)
        for images, labels in _data_loader(dataset, batches, self.num_threads, self.device):
            yield (_to_device(images, self.device),
                   _to_device(_checked_labels(labels, self.shards.num_classes, self.shards.dir), self.device))


def reference_eval_samples(shard_dir: Path, pca: dict, *, crop: int = 224,
                           limit: int | None = None) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(key, centre-crop image float32 [3, crop, crop], label) of the first `limit` samples, in shard order."""
    shards = ShardSet.open(shard_dir)
    shards.check_crop(crop)
    refs = shard_samples(shards)[:limit]
    dataset = _ReferenceEvalSet(refs, pca, crop, ten_crop=False)
    for i, ref in enumerate(refs):
        image, label = dataset[i]
        yield ref.key, image, label


# ---------------------------------------------------------------------------------------------------------------
# chosen by name


LOADERS = ("dali", "torch")


def make_train_loader(shard_dir: Path, pca: dict, batch_size: int, *, loader: str = "dali",
                      **options) -> TrainLoader | ReferenceTrainLoader:
    """`loader="dali"` (TrainLoader) or `"torch"` (ReferenceTrainLoader); options are theirs (crop, seed, rank,
    world_size, device, num_threads, lighting, mirror, random_crop, channels_last, lighting_alpha_std)."""
    if loader == "dali":
        return TrainLoader(shard_dir, pca, batch_size, **options)
    if loader == "torch":
        return ReferenceTrainLoader(shard_dir, pca, batch_size, **options)
    raise PipeError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")


def make_eval_loader(shard_dir: Path, pca: dict, batch_size: int, *, loader: str = "dali",
                     **options) -> EvalLoader | ReferenceEvalLoader:
    """`loader="dali"` (EvalLoader) or `"torch"` (ReferenceEvalLoader); options: crop, ten_crop, rank, world_size,
    device, num_threads."""
    if loader == "dali":
        return EvalLoader(shard_dir, pca, batch_size, **options)
    if loader == "torch":
        return ReferenceEvalLoader(shard_dir, pca, batch_size, **options)
    raise PipeError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
