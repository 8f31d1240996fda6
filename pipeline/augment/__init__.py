"""Augmentation (paper §2, §4.1): the training crops, mirrors and PCA lighting, and the test-time centre crop and
10-crop, as NVIDIA DALI pipelines (`dali`); the same transforms in plain torch as the reference path (`reference`);
the crop boxes and lighting both use, once (`geometry`); each epoch's order and every random draw, computed
(`order`); what their loaders share (`loading`).

Every image in a shard has short side 256 (aspect kept). The paper's recipe, in its order:

- the central `side`×`side` square, `side` = the short side (256): `centre_square`;
- train: a uniformly random `crop`×`crop` patch inside it (every integer offset 0..side−crop equally likely), mirrored
  with p=0.5, plus the lighting offset `255 · eigvecs @ (α ⊙ eigvals)`, α ~ N(0, 0.1)³ drawn each time an image is
  used (`lighting_offset`); test: the centre patch (`centre_crop_box`), or the 10 patches of `ten_crop_boxes`;
- minus the training mean, `255 · pca.json mean` per channel (§2; no division by std: the paper has none).

Outputs are plain torch tensors on the loader's device: images float32 [B, 3, H, W] (channels-last strides when asked;
10-crop: [B, 10, 3, H, W], views in `TEN_CROP_VIEWS` order) and labels int64 [B].

Epochs are exact and computed (`order.py`): epoch e is a seeded permutation of every training sample, global batch b
its samples [b·B, (b+1)·B), rank r of R its slice [b·B + r·B/R, b·B + (r+1)·B/R); the last partial global batch is
dropped. The loader's whole state is (epoch, global batches consumed): a resume starts reading there, on any number
of ranks. Evaluation reads every sample exactly once (a contiguous part per rank; the padded last batch trimmed).

The loaders import torch and DALI; this package imports them only when one is asked for, so that DALI's Python
workers, which import `order.py`, start without them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.augment.geometry import (
    LIGHTING_ALPHA_STD,
    TEN_CROP_VIEWS,
    centre_crop_box,
    centre_square,
    lighting_offset,
    rank_range,
    ten_crop_boxes,
)
from pipeline.augment.order import ORDER_VERSION, batch_draws, epoch_order
from pipeline.config import LOADERS
from pipeline.errors import PipeError

if TYPE_CHECKING:
    from pipeline.records import PixelStats

# the loaders by name: (training loader, evaluation loader), each "module:class"
_LOADERS = dict(zip(LOADERS, (("dali", "TrainLoader", "EvalLoader"),
                              ("reference", "ReferenceTrainLoader", "ReferenceEvalLoader")), strict=True))
_LAZY = {"TrainLoader": "dali", "EvalLoader": "dali", "ReferenceTrainLoader": "reference",
         "ReferenceEvalLoader": "reference", "reference_eval_samples": "reference"}


def __getattr__(name: str) -> Any:
    """The loaders, imported (with torch and DALI) when first used."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"pipeline.augment.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _loader(name: str, which: int) -> type:
    if name not in _LOADERS:
        raise PipeError(f"expected one of {', '.join(LOADERS)}, got {name!r}", option="loader")
    module, *classes = _LOADERS[name]
    return getattr(importlib.import_module(f"pipeline.augment.{module}"), classes[which])


def make_train_loader(shard_dir: Path, pixels: PixelStats, batch_size: int, *, loader: str = LOADERS[0],
                      **options) -> Any:
    """`loader="dali"` (TrainLoader) or `"torch"` (ReferenceTrainLoader); `batch_size` is this rank's; options are
    theirs (crop, seed, rank, world_size, device, num_threads, lighting, mirror, random_crop, channels_last,
    lighting_alpha_std)."""
    return _loader(loader, 0)(shard_dir, pixels, batch_size, **options)


def make_eval_loader(shard_dir: Path, pixels: PixelStats, batch_size: int, *, loader: str = LOADERS[0],
                     **options) -> Any:
    """`loader="dali"` (EvalLoader) or `"torch"` (ReferenceEvalLoader); options: crop, ten_crop, rank, world_size,
    device, num_threads."""
    return _loader(loader, 1)(shard_dir, pixels, batch_size, **options)


__all__ = [
    "LIGHTING_ALPHA_STD", "LOADERS", "ORDER_VERSION", "TEN_CROP_VIEWS", "EvalLoader", "ReferenceEvalLoader",
    "ReferenceTrainLoader", "TrainLoader", "batch_draws", "centre_crop_box", "centre_square", "epoch_order",
    "lighting_offset", "make_eval_loader", "make_train_loader", "rank_range", "reference_eval_samples",
    "ten_crop_boxes",
]
