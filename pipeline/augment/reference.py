"""The torch reference path: Pillow decode + torch ops in a DataLoader with workers, the same transforms as the DALI
pipelines. It reads the same samples by the byte ranges in the shards' DALI index files, with the same rank split and
exact epochs. It is the parity oracle for tests, the baseline for `bench/loader.py`, and `--loader torch`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.artifacts import PixelStats
from pipeline.augment.geometry import (
    CROP,
    LIGHTING_ALPHA_STD,
    REFERENCE,
    SHARD_ORDER,
    centre_crop_box,
    centre_inset,
    centre_square,
    derive_seed,
    epoch_shard_order,
    lighting_matrix,
    rank_range,
    ten_crop_boxes,
)
from pipeline.augment.loading import Batch, ShardSet, TrainEpochs, checked_labels, open_shards, to_device, torch_device
from pipeline.errors import PipeError


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
    dx, dy = (torch.randint(0, room + 1, (2,), generator=generator).tolist() if random_crop
              else (centre_inset(side, crop),) * 2)
    flip = bool(torch.rand((), generator=generator) < 0.5) and mirror
    alpha = torch.randn(3, generator=generator, dtype=torch.float64) * (lighting_alpha_std if lighting else 0.0)
    return dx, dy, flip, alpha


class _ReferenceTrainSet(torch.utils.data.Dataset):
    """Item (sample index, position in this rank's epoch) → (augmented image, label). The augmentation draw is
    seeded by (seed, epoch, rank, position), so it does not depend on which worker makes the item."""

    def __init__(self, refs: list[SampleRef], pixels: PixelStats, crop: int, seed: int, epoch: int, rank: int,
                 options: dict):
        self.refs, self.crop, self.seed, self.epoch, self.rank, self.options = refs, crop, seed, epoch, rank, options
        self.mean = 255.0 * torch.tensor(pixels.mean, dtype=torch.float64)
        self.light = torch.from_numpy(lighting_matrix(pixels.eigvals, pixels.eigvecs))
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
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, position, REFERENCE))
        dx, dy, flip, alpha = draw_train_params(generator, side, self.crop, **self.options)
        offset = self.light @ alpha
        patch = reference_patch(image, left + dx, top + dy, self.crop, flip, self.mean - offset)
        return patch, int(self.bytes.read(ref.tar, ref.cls)), image, (left + dx, top + dy), flip, offset


class _ReferenceEvalSet(torch.utils.data.Dataset):
    def __init__(self, refs: list[SampleRef], pixels: PixelStats, crop: int, ten_crop: bool):
        self.refs, self.crop, self.ten_crop = refs, crop, ten_crop
        self.mean = 255.0 * torch.tensor(pixels.mean, dtype=torch.float64)
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
                                       prefetch_factor=4 if num_workers else None,
                                       worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm signals every process of a job step, and Ctrl-C the terminal's whole process group: a worker must
    outlive SIGTERM/SIGUSR1/SIGINT so that its rank can finish the step and write the checkpoint (the rank ends its
    workers itself)."""
    import signal

    for stop in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(stop, signal.SIG_IGN)


class ReferenceTrainLoader(TrainEpochs):
    """`TrainLoader`'s contract in plain torch: the same rank split, exact epochs, batch count and resume; within a
    rank's part the order is a full permutation seeded by (seed, epoch, rank). `num_threads` DataLoader workers."""

    def __init__(self, shard_dir: Path, pixels: PixelStats, batch_size: int, *, crop: int = CROP, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", num_threads: int = 2,
                 lighting: bool = True, mirror: bool = True, random_crop: bool = True, channels_last: bool = False,
                 lighting_alpha_std: float = LIGHTING_ALPHA_STD):
        self.shards = open_shards(shard_dir, crop=crop, batch_size=batch_size, rank=rank, world_size=world_size,
                                  seed=seed, whole_batch=True)
        self.refs = shard_samples(self.shards)
        self.pixels, self.crop, self.batch_size, self.seed = pixels, crop, batch_size, seed
        self.rank, self.world_size, self.num_threads = rank, world_size, num_threads
        self.device, self.channels_last = torch_device(device), channels_last
        self.options = {"random_crop": random_crop, "mirror": mirror, "lighting": lighting,
                        "lighting_alpha_std": lighting_alpha_std}

    def epoch_samples(self, epoch: int) -> list[int]:
        """Sample indices this rank trains on in `epoch`, in order (len(self) × batch_size of them)."""
        starts = np.cumsum((0, *self.shards.counts))
        order = [starts[s] + j for s in epoch_shard_order(len(self.shards.tars), self.seed, epoch)
                 for j in range(self.shards.counts[s])]
        mine = [order[p] for p in rank_range(len(order), self.rank, self.world_size)]
        permutation = torch.randperm(len(mine), generator=torch.Generator().manual_seed(
            derive_seed(self.seed, epoch, self.rank, SHARD_ORDER, REFERENCE)))
        return [int(mine[p]) for p in permutation[:len(self) * self.batch_size]]

    def dataset(self, epoch: int) -> _ReferenceTrainSet:
        """Item (sample index, position in `epoch`) → (augmented image, label)."""
        return _ReferenceTrainSet(self.refs, self.pixels, self.crop, self.seed, epoch, self.rank, self.options)

    def __iter__(self) -> Iterator[Batch]:
        start, self._resume_at = self._resume_at, 0
        order, b = self.epoch_samples(self.epoch), self.batch_size
        batches = [[(order[p], p) for p in range(i * b, (i + 1) * b)] for i in range(start, len(self))]
        dataset = self.dataset(self.epoch)
        for i, (images, labels) in enumerate(_data_loader(dataset, batches, self.num_threads, self.device), start):
            images = to_device(images, self.device)
            if self.channels_last:  # after the copy: a layout change of a pinned batch would be a pageable copy
                images = images.contiguous(memory_format=torch.channels_last)
            self._position = i + 1
            yield images, to_device(checked_labels(labels, self.shards), self.device)


class ReferenceEvalLoader:
    """`EvalLoader`'s contract in plain torch: this rank's part of the shards in order, each sample once."""

    def __init__(self, shard_dir: Path, pixels: PixelStats, batch_size: int, *, crop: int = CROP,
                 ten_crop: bool = False, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 num_threads: int = 2):
        self.shards = open_shards(shard_dir, crop=crop, batch_size=batch_size, rank=rank, world_size=world_size)
        self.refs = shard_samples(self.shards)
        self.pixels, self.crop, self.ten_crop, self.batch_size = pixels, crop, ten_crop, batch_size
        self.device, self.num_threads = torch_device(device), num_threads
        self.indices = list(rank_range(self.shards.samples, rank, world_size))
        self.samples = len(self.indices)

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        b = self.batch_size
        batches = [self.indices[i:i + b] for i in range(0, self.samples, b)]
        dataset = _ReferenceEvalSet(self.refs, self.pixels, self.crop, self.ten_crop)
        for images, labels in _data_loader(dataset, batches, self.num_threads, self.device):
            yield to_device(images, self.device), to_device(checked_labels(labels, self.shards), self.device)


def reference_eval_samples(shard_dir: Path, pixels: PixelStats, *, crop: int = CROP,
                           limit: int | None = None) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(key, centre-crop image float32 [3, crop, crop], label) of the first `limit` samples, in shard order."""
    refs = shard_samples(open_shards(shard_dir, crop=crop))[:limit]
    dataset = _ReferenceEvalSet(refs, pixels, crop, ten_crop=False)
    for i, ref in enumerate(refs):
        image, label = dataset[i]
        yield ref.key, image, label
