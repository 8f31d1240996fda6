"""The torch reference path: Pillow decode + torch ops in a DataLoader with workers, the same transforms as the DALI
pipelines. It reads the same samples by the byte ranges in the shards' DALI index files, in the same computed order
with the same draws (`order.py`), so its training batches are the DALI loader's pixel for pixel. It is the parity
oracle for tests, the baseline for `bench/loader.py`, and `--loader torch`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.augment.geometry import CROP, LIGHTING_ALPHA_STD, centre_crop_box, rank_range, ten_crop_boxes
from pipeline.augment.loading import (
    Batch,
    TrainEpochs,
    checked_labels,
    open_shards,
    sample_index,
    to_device,
    torch_device,
)
from pipeline.augment.order import SampleIndex, SampleReader, TrainSource
from pipeline.records import PixelStats


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


class _ReferenceTrainSet(torch.utils.data.Dataset):
    """Item (sample index, its row of draws) → (augmented image, label): the crop corner, flip and pixel mean come
    from the same `TrainSource.sample` that feeds the DALI graph, so which worker makes an item changes nothing."""

    def __init__(self, source: TrainSource):
        self.source, self.crop = source, source.augmentation.crop

    def __len__(self) -> int:
        return len(self.source.index)

    def __getitem__(self, item: tuple[int, np.ndarray]) -> tuple[torch.Tensor, int]:
        patch, label, *_ = self.augment(*item)
        return patch, label

    def augment(self, index: int, draw: np.ndarray):
        """(patch, label, original uint8 [3, H, W], (left, top) of the crop, mirrored, pixel mean [3])."""
        jpg, label, (x, y), flip, pixel_mean = self.source.sample(index, draw)
        image = decode_rgb(jpg)
        patch = reference_patch(image, x, y, self.crop, flip, torch.from_numpy(pixel_mean))
        return patch, label, image, (x, y), flip, pixel_mean


class _ReferenceEvalSet(torch.utils.data.Dataset):
    def __init__(self, index: SampleIndex, pixels: PixelStats, crop: int, ten_crop: bool):
        self.reader, self.crop, self.ten_crop = SampleReader(index), crop, ten_crop
        self.mean = 255.0 * torch.tensor(pixels.mean, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.reader.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        jpg, label = self.reader.read(i)
        image = decode_rgb(jpg)
        width, height = image.shape[2], image.shape[1]
        if self.ten_crop:
            out = torch.stack([reference_patch(image, box[0], box[1], self.crop, flip, self.mean)
                               for box, flip in ten_crop_boxes(width, height, self.crop)])
        else:
            box = centre_crop_box(width, height, self.crop)
            out = reference_patch(image, box[0], box[1], self.crop, False, self.mean)
        return out, label


def _data_loader(dataset, batches: list, num_workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """A DataLoader over fixed batches with its own generator: without one, each new iterator draws its workers'
    base seed from the global torch RNG, and a resumed run's later draws (dropout outside the masks) would shift."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       pin_memory=device.type == "cuda",
                                       prefetch_factor=4 if num_workers else None,
                                       worker_init_fn=_ignore_stop_signals, generator=torch.Generator().manual_seed(0))


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm signals every process of a job step, and Ctrl-C the terminal's whole process group: a worker must
    outlive SIGTERM/SIGUSR1/SIGINT so that its rank can finish the step and write the checkpoint (the rank ends its
    workers itself)."""
    import signal

    for stop in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(stop, signal.SIG_IGN)


class ReferenceTrainLoader(TrainEpochs):
    """`TrainLoader`'s contract in plain torch: the same computed order, draws, batches and resume (its batches are
    the DALI loader's, pixel for pixel). `num_threads` DataLoader workers."""

    def __init__(self, shard_dir: Path, pixels: PixelStats, batch_size: int, *, crop: int = CROP, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", num_threads: int = 2,
                 lighting: bool = True, mirror: bool = True, random_crop: bool = True, channels_last: bool = False,
                 lighting_alpha_std: float = LIGHTING_ALPHA_STD):
        self._open(shard_dir, pixels, batch_size, crop=crop, seed=seed, rank=rank, world_size=world_size,
                   random_crop=random_crop, mirror=mirror, lighting=lighting, lighting_alpha_std=lighting_alpha_std)
        self.num_threads, self.device, self.channels_last = num_threads, torch_device(device), channels_last

    def dataset(self, epoch: int) -> _ReferenceTrainSet:
        """Item (sample index, draws) → (augmented image, label)."""
        return _ReferenceTrainSet(self.source(epoch))

    def __iter__(self) -> Iterator[Batch]:
        start, self._resume_at = self._resume_at, 0
        source = self.source(self.epoch)
        batches = [list(zip(source.positions(b).tolist(), source.draws(b), strict=True))
                   for b in range(start, len(self))]
        dataset = _ReferenceTrainSet(source)
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
        self.index = sample_index(self.shards)
        self.pixels, self.crop, self.ten_crop, self.batch_size = pixels, crop, ten_crop, batch_size
        self.device, self.num_threads = torch_device(device), num_threads
        self.indices = list(rank_range(self.shards.samples, rank, world_size))
        self.samples = len(self.indices)

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        b = self.batch_size
        batches = [self.indices[i:i + b] for i in range(0, self.samples, b)]
        dataset = _ReferenceEvalSet(self.index, self.pixels, self.crop, self.ten_crop)
        for images, labels in _data_loader(dataset, batches, self.num_threads, self.device):
            yield to_device(images, self.device), to_device(checked_labels(labels, self.shards), self.device)


def reference_eval_samples(shard_dir: Path, pixels: PixelStats, *, crop: int = CROP,
                           limit: int | None = None) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(key, centre-crop image float32 [3, crop, crop], label) of the first `limit` samples, in shard order."""
    index = sample_index(open_shards(shard_dir, crop=crop))
    dataset = _ReferenceEvalSet(index, pixels, crop, ten_crop=False)
    for i, key in enumerate(index.keys[:limit]):
        image, label = dataset[i]
        yield key, image, label
