"""Augmentation (paper §2, §4.1): the training crops, mirrors and PCA lighting, and the test-time centre crop and
10-crop, as NVIDIA DALI pipelines (`dali`); the same transforms in plain torch as the reference path (`reference`);
the crop boxes, lighting and epoch math both use, once (`geometry`); what their loaders share (`loading`).

Every image in a shard has short side 256 (aspect kept). The paper's recipe, in its order:

- the central `side`×`side` square, `side` = the short side (256): `centre_square`;
- train: a uniformly random `crop`×`crop` patch inside it (every integer offset 0..side−crop equally likely), mirrored
  with p=0.5, plus the lighting offset `255 · eigvecs @ (α ⊙ eigvals)`, α ~ N(0, 0.1)³ drawn each time an image is
  used (`lighting_offset`); test: the centre patch (`centre_crop_box`), or the 10 patches of `ten_crop_boxes`;
- minus the training mean, `255 · pca.json mean` per channel (§2; no division by std: the paper has none).

Outputs are plain torch tensors on the loader's device: images float32 [B, 3, H, W] (channels-last strides when asked;
10-crop: [B, 10, 3, H, W], views in `TEN_CROP_VIEWS` order) and labels int64 [B].

Epochs are exact: each epoch the shard file order is permuted by (seed, epoch); rank r of W reads samples
[⌊rN/W⌋, ⌊(r+1)N/W⌋) of that order (DALI's own split), and every rank yields ⌊N / (B·W)⌋ batches of B, so no sample is
seen twice and the last partial global batch is dropped on every rank. The DALI pipeline is rebuilt each epoch with
its seed derived from (seed, epoch, rank), so an epoch's batches are a function of those three numbers: a resumed
epoch runs the consumed batches through the pipeline again (their loading time, not their training time) and yields
the remaining ones exactly as an uninterrupted run would. Evaluation reads every sample exactly once (the padded last
batch is trimmed).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import PixelStats
from pipeline.augment.dali import EvalLoader, TrainLoader
from pipeline.augment.geometry import (
    LIGHTING_ALPHA_STD,
    TEN_CROP_VIEWS,
    centre_crop_box,
    centre_square,
    epoch_shard_order,
    lighting_offset,
    rank_range,
    ten_crop_boxes,
)
from pipeline.augment.reference import ReferenceEvalLoader, ReferenceTrainLoader, reference_eval_samples
from pipeline.config import LOADERS
from pipeline.errors import PipeError
from pipeline.pca import load_pca

# the loaders by name: (training loader, evaluation loader)
_LOADERS = dict(zip(LOADERS, ((TrainLoader, EvalLoader), (ReferenceTrainLoader, ReferenceEvalLoader)), strict=True))


def _loaders(name: str) -> tuple[type, type]:
    if name not in _LOADERS:
        raise PipeError(f"loader must be one of {', '.join(LOADERS)}, got {name!r}")
    return _LOADERS[name]


def make_train_loader(shard_dir: Path, pixels: PixelStats, batch_size: int, *, loader: str = LOADERS[0],
                      **options) -> TrainLoader | ReferenceTrainLoader:
    """`loader="dali"` (TrainLoader) or `"torch"` (ReferenceTrainLoader); options are theirs (crop, seed, rank,
    world_size, device, num_threads, lighting, mirror, random_crop, channels_last, lighting_alpha_std)."""
    return _loaders(loader)[0](shard_dir, pixels, batch_size, **options)


def make_eval_loader(shard_dir: Path, pixels: PixelStats, batch_size: int, *, loader: str = LOADERS[0],
                     **options) -> EvalLoader | ReferenceEvalLoader:
    """`loader="dali"` (EvalLoader) or `"torch"` (ReferenceEvalLoader); options: crop, ten_crop, rank, world_size,
    device, num_threads."""
    return _loaders(loader)[1](shard_dir, pixels, batch_size, **options)


__all__ = [
    "LIGHTING_ALPHA_STD", "LOADERS", "TEN_CROP_VIEWS", "EvalLoader", "ReferenceEvalLoader", "ReferenceTrainLoader",
    "TrainLoader", "centre_crop_box", "centre_square", "epoch_shard_order", "lighting_offset", "load_pca",
    "make_eval_loader", "make_train_loader", "rank_range", "reference_eval_samples", "ten_crop_boxes",
]
