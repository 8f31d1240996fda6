"""What the DALI loaders and the torch reference loaders share: the shard set they read, the one check of their
constructor arguments, the exact-epoch bookkeeping of a training loader, and the hand-off of plain torch tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.augment.order import SampleIndex, TrainAugmentation, TrainSource, batches_per_epoch
from pipeline.errors import PipeError
from pipeline.records import LoaderPosition, Manifest, PixelStats
from pipeline.shards import check_shard_files, shard_paths

Batch = tuple[torch.Tensor, torch.Tensor]


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
        manifest = Manifest.read(shard_dir)
        pairs = shard_paths(shard_dir, manifest)
        missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise PipeError(f"{shard_dir}: shard files listed in manifest.json are missing: {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        check_shard_files(shard_dir, manifest)  # a cut or resized tar: one line, not DALI's "Malformed index file"
        if not pairs or manifest.samples == 0:
            raise PipeError(f"{shard_dir}: the manifest lists no samples")
        return cls(shard_dir, tuple(str(t) for t, _ in pairs), tuple(str(i) for _, i in pairs),
                   tuple(s.samples for s in manifest.shards), manifest.num_classes_total,
                   manifest.params.short_side)


def open_shards(shard_dir: Path, *, crop: int, batch_size: int = 1, rank: int = 0, world_size: int = 1,
                seed: int = 0, whole_batch: bool = False) -> ShardSet:
    """The shard set a loader reads, after the checks every loader makes of its arguments; `whole_batch`: a
    training loader, which needs at least one global batch."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise PipeError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world_size")
    if batch_size < 1:
        raise PipeError(f"batch size must be at least 1, got {batch_size}")
    if seed < 0:
        raise PipeError(f"seed must be non-negative, got {seed}")
    shards = ShardSet.open(shard_dir)
    if not 1 <= crop <= shards.short_side:
        raise PipeError(f"crop {crop} does not fit the {shards.short_side}-pixel short side of {shards.dir}")
    if whole_batch and batches_per_epoch(shards.samples, batch_size * world_size) == 0:
        raise PipeError(f"{shards.dir} holds {shards.samples} samples, fewer than one global batch "
                        f"({batch_size} × {world_size} ranks)")
    return shards


def sample_index(shards: ShardSet) -> SampleIndex:
    """Where each sample's bytes lie, from the shards' DALI index files (read once per loader)."""
    return SampleIndex.of(shards.tars, shards.indexes, shards.counts)


def torch_device(device: str | torch.device) -> torch.device:
    """The loader's device, with a CUDA index (the current device when none is given)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise PipeError(f"loader device must be cpu or cuda[:N], got {device}")
    return device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`, without making the host wait for the GPU (pinned memory, non-blocking copy)."""
    if device.type == "cpu":
        return tensor
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def checked_labels(labels: torch.Tensor, shards: ShardSet) -> torch.Tensor:
    """`labels`, if each is a class of the shard set's list (a damaged cls would otherwise train silently)."""
    num_classes = shards.num_classes
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise PipeError(f"{shards.dir}: a sample's cls is not a label in 0..{num_classes - 1} (parsed {bad}); "
                        "the shards are damaged or from another class list")
    return labels


class TrainEpochs:
    """Where a training loader stands: the epoch and the global batches consumed in it (the same on every rank, and
    for any number of ranks: the loader's whole state)."""

    shards: ShardSet
    batch_size: int
    world_size: int
    rank: int
    seed: int
    index: SampleIndex
    augmentation: TrainAugmentation
    epoch: int = 0
    _resume_at: int = 0  # batches the next iteration skips
    _position: int = 0  # batches handed out in this epoch

    def _open(self, shard_dir: Path, pixels: PixelStats, batch_size: int, *, crop: int, seed: int, rank: int,
              world_size: int, random_crop: bool, mirror: bool, lighting: bool, lighting_alpha_std: float) -> None:
        """What both loaders read an epoch from: the shards, their sample index and the augmentation's settings."""
        self.shards = open_shards(shard_dir, crop=crop, batch_size=batch_size, rank=rank, world_size=world_size,
                                  seed=seed, whole_batch=True)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.index = sample_index(self.shards)
        self.augmentation = TrainAugmentation(crop, tuple(pixels.mean), tuple(pixels.eigvals),
                                              tuple(map(tuple, pixels.eigvecs)), random_crop, mirror, lighting,
                                              lighting_alpha_std)

    def source(self, epoch: int, start: int = 0) -> TrainSource:
        """What this rank reads of `epoch` from global batch `start` on."""
        return TrainSource(self.index, self.augmentation, self.seed, epoch, self.batch_size * self.world_size,
                           self.rank, self.world_size, start)

    def __len__(self) -> int:
        return batches_per_epoch(self.shards.samples, self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._resume_at, self._position = epoch, 0, 0

    def state_dict(self) -> LoaderPosition:
        return LoaderPosition(self.epoch, self._position)

    def load_state_dict(self, state: LoaderPosition) -> None:
        if not 0 <= state.batches <= len(self):
            raise PipeError(f"loader state {state} does not fit an epoch of {len(self)} batches")
        self.epoch, self._resume_at, self._position = state.epoch, state.batches, state.batches
