"""The order of an epoch and every random draw of its augmentation, computed, never inherited from a reader.

Epoch e's samples are a seeded permutation of the whole training set (`epoch_order`), the same whatever the number
of ranks: global batch b is samples [b·B, (b+1)·B) of it, and rank r of R reads its slice
[b·B + r·B/R, b·B + (r+1)·B/R). Every draw of a sample's augmentation (the crop offset, the flip, the lighting α)
is a function of (seed, epoch, b, its position in the batch) (`batch_draws`), never of the rank or of how many
samples a rank has drawn before. So a resume starts reading at its batch (nothing consumed is decoded again), and a
run stopped on R ranks continues on R′ with the same global batches.

Reading: a full permutation reads each sample at a random offset of a random shard (one `pread` of its cls and jpg
members, ~110 KB at short side 256). At the GPU goal of 18,000 images/s that is ~2 GB/s of random reads: local NVMe
or the page cache serve it; a network file system may not (then shard the data onto local disk first).

Both loaders use what is here: the DALI graph is fed each sample's bytes and its crop, flip and pixel mean by an
external source (`TrainSource`); the torch reference path computes the same from the same functions. No torch and
no DALI here: DALI's Python workers import this module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from pipeline.augment.geometry import (
    LIGHTING_ALPHA_STD,
    centre_crop_box,
    centre_inset,
    centre_square,
    lighting_matrix,
)
from pipeline.errors import PipeError

ORDER_VERSION = 2  # 1: each rank read a contiguous part of DALI's reader over per-epoch permuted shard files
EPOCH_ORDER, DRAWS = 11, 12  # seed-stream tags: (seed, epoch[, batch]) streams never coincide with other uses


def epoch_order(samples: int, seed: int, epoch: int) -> np.ndarray:
    """Sample indices of epoch `epoch` in the order they are trained: a seeded permutation of all of them."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, EPOCH_ORDER])).permutation(samples)


def batches_per_epoch(samples: int, global_batch: int) -> int:
    """Global batches of an epoch: the last partial one is dropped (on every rank)."""
    return samples // global_batch


def rank_slice(global_batch: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch that rank `rank` of `world_size` trains on."""
    per_rank = global_batch // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def batch_draws(seed: int, epoch: int, batch: int, size: int) -> np.ndarray:
    """[size, 6] draws of global batch `batch`, row i for its i-th sample: u_x, u_y, u_flip ~ U[0, 1) and
    α ~ N(0, 1)³ (scaled by the lighting's std where it is used)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, batch, DRAWS]))
    return np.concatenate([rng.random((size, 3)), rng.standard_normal((size, 3))], axis=1)


@dataclass(frozen=True)
class TrainAugmentation:
    """The training transform's settings (§4.1) and the pixel statistics it uses."""

    crop: int
    mean: tuple[float, ...]  # [0, 1] units
    eigvals: tuple[float, ...]
    eigvecs: tuple[tuple[float, ...], ...]
    random_crop: bool = True
    mirror: bool = True
    lighting: bool = True
    lighting_alpha_std: float = LIGHTING_ALPHA_STD

    def of(self, width: int, height: int, draw: np.ndarray) -> tuple[int, int, bool, np.ndarray]:
        """(x, y) of the crop's top-left pixel, mirrored, and the pixel mean to subtract (float32 [3], 0–255: the
        training mean minus the lighting offset) for an image of `width`×`height` and its row of draws."""
        left, top, side = centre_square(width, height)
        room = side - self.crop
        if self.random_crop:  # each integer offset 0..room equally likely
            dx, dy = (min(math.floor(u * (room + 1)), room) for u in draw[:2])
        else:
            dx = dy = centre_inset(side, self.crop)
        flip = bool(draw[2] < 0.5) and self.mirror
        alpha = draw[3:6] * (self.lighting_alpha_std if self.lighting else 0.0)
        offset = lighting_matrix(self.eigvals, self.eigvecs) @ alpha
        pixel_mean = (255.0 * np.asarray(self.mean, dtype=np.float64) - offset).astype(np.float32)
        return left + dx, top + dy, flip, pixel_mean


# ---------------------------------------------------------------------------------------------------------------
# where each sample's bytes are


@dataclass(frozen=True)
class SampleIndex:
    """Every sample of a shard set, in manifest and index order: its shard and the byte ranges of its cls and jpg
    members (from the shards' DALI index files). A sample's two members are read with one pread: cls comes first."""

    tars: tuple[str, ...]
    keys: tuple[str, ...]
    shard: np.ndarray  # int32 [N]
    cls_offset: np.ndarray  # int64 [N]
    cls_size: np.ndarray
    jpg_offset: np.ndarray
    jpg_size: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def of(cls, tars: Sequence[str], indexes: Sequence[str], counts: Sequence[int]) -> SampleIndex:
        keys, columns = [], []
        for shard, (index, count) in enumerate(zip(indexes, counts, strict=True)):
            lines = Path(index).read_text().splitlines()[1:]
            if len(lines) != count:
                raise PipeError(f"{index}: expected {count} samples (manifest.json), found {len(lines)}")
            for line in lines:
                fields = line.split()
                parts = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                         for i in range(0, len(fields), 4)}
                if "jpg" not in parts or "cls" not in parts:
                    raise PipeError(f"{index}: expected jpg and cls members in every sample, found {line!r}")
                keys.append(parts["jpg"][2].removesuffix(".jpg"))
                columns.append((shard, *parts["cls"][:2], *parts["jpg"][:2]))
        table = np.array(columns, dtype=np.int64).reshape(-1, 5)
        return cls(tuple(tars), tuple(keys), table[:, 0].astype(np.int32), table[:, 1], table[:, 2], table[:, 3],
                   table[:, 4])


class SampleReader:
    """Reads a sample's jpg bytes and label by offset; one descriptor per shard and process (DataLoader and DALI
    workers read with their own)."""

    def __init__(self, index: SampleIndex):
        self.index = index
        self._fds: dict[tuple[int, int], int] = {}

    def read(self, i: int) -> tuple[bytes, int]:
        index = self.index
        shard, start, end = int(index.shard[i]), int(index.cls_offset[i]), int(index.jpg_offset[i] + index.jpg_size[i])
        key = (os.getpid(), shard)
        if key not in self._fds:
            self._fds[key] = os.open(index.tars[shard], os.O_RDONLY)
        data = os.pread(self._fds[key], end - start, start)
        if len(data) != end - start:
            raise PipeError(f"{index.tars[shard]}: cut short inside sample {index.keys[i]}; run `alexnet-pipe verify`")
        label = data[: index.cls_size[i]]
        jpg = data[int(index.jpg_offset[i]) - start:]
        return jpg, int(label)

    def __reduce__(self) -> tuple[type[SampleReader], tuple[SampleIndex]]:  # descriptors stay with their process
        return SampleReader, (self.index,)

    def __del__(self) -> None:
        for (pid, _), fd in self._fds.items():
            if pid == os.getpid():
                os.close(fd)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, without decoding: the crop is placed before the decode."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    raise ValueError("no JPEG frame header")


# ---------------------------------------------------------------------------------------------------------------
# what a training loader hands its decoder, batch by batch


@dataclass
class TrainSource:
    """Global batch `start + i` of `epoch`, this rank's slice of it, for call i: each sample's jpg bytes and label,
    and the crop's top-left corner, the flip and the pixel mean its augmentation draws. A DALI external source in
    batch mode (serial, or in worker processes: it pickles), and the torch reference path's sampler alike."""

    index: SampleIndex
    augmentation: TrainAugmentation
    seed: int
    epoch: int
    global_batch: int
    rank: int
    world_size: int
    start: int = 0  # the global batch this pass begins at (a resume jumps here)

    def __post_init__(self) -> None:
        self.reader = SampleReader(self.index)
        self._order: np.ndarray | None = None

    @property
    def batches(self) -> int:
        return batches_per_epoch(len(self.index), self.global_batch)

    def positions(self, batch: int) -> np.ndarray:
        """Sample indices of this rank's slice of global batch `batch`."""
        if self._order is None:
            self._order = epoch_order(len(self.index), self.seed, self.epoch)
        rows = rank_slice(self.global_batch, self.rank, self.world_size)
        return self._order[batch * self.global_batch:(batch + 1) * self.global_batch][rows]

    def draws(self, batch: int) -> np.ndarray:
        rows = rank_slice(self.global_batch, self.rank, self.world_size)
        return batch_draws(self.seed, self.epoch, batch, self.global_batch)[rows]

    def sample(self, i: int, draw: np.ndarray) -> tuple[bytes, int, tuple[int, int], bool, np.ndarray]:
        """(jpg bytes, label, (x, y) of the crop, mirrored, pixel mean) of sample `i` under its row of draws."""
        jpg, label = self.reader.read(i)
        x, y, flip, pixel_mean = self.augmentation.of(*jpeg_size(jpg), draw)
        return jpg, label, (x, y), flip, pixel_mean

    def __call__(self, info) -> tuple[list, ...]:
        """DALI's batch callback: (jpgs, labels, anchors, flips, pixel means), each a list over this rank's slice."""
        batch = self.start + (info if isinstance(info, int) else info.iteration)
        if batch >= self.batches:
            raise StopIteration
        columns: tuple[list, ...] = ([], [], [], [], [])
        for i, draw in zip(self.positions(batch), self.draws(batch), strict=True):
            jpg, label, anchor, flip, pixel_mean = self.sample(int(i), draw)
            for column, value in zip(columns, (np.frombuffer(jpg, dtype=np.uint8), np.array(label, dtype=np.int64),
                                               np.array(anchor, dtype=np.int32), np.array(flip, dtype=np.int32),
                                               pixel_mean), strict=True):
                column.append(value)
        return columns

    def __reduce__(self) -> tuple[type[TrainSource], tuple]:
        """Its fields only: the order is recomputed in the worker (cheaper to draw than to pickle), the reader
        opens its own descriptors."""
        return TrainSource, tuple(getattr(self, f.name) for f in fields(self))


def centre_anchor(jpg: bytes, crop: int) -> tuple[int, int]:
    """The top-left pixel of the test-time centre crop of an image (as `centre_crop_box`), from its header."""
    left, top, _, _ = centre_crop_box(*jpeg_size(jpg), crop)
    return left, top
