"""The DALI side of augmentation: one `@pipeline_def` per pipeline (train / val centre / val 10-crop), whose
arguments are the only knobs, and the loaders that run them and hand the trainer plain torch tensors.

Training is fed by an external source (`pipeline.augment.order.TrainSource`): each sample's encoded bytes in the
epoch's computed order, with the crop corner, the flip and the pixel mean (the training mean minus the lighting
offset) its draws give; DALI decodes only the crop window (ROI decode: nvJPEG with `mixed` on a GPU) and mirrors and
subtracts. The centre crop of the val graph is decoded the same way, its window placed with
`pipeline.augment.geometry`'s functions on DALI's per-sample nodes; the 10-crop graph decodes the whole image.

On the CPU an image batch shares DALI's output buffer (no copy); on a GPU it is one device-to-device copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.augment.geometry import CROP, LIGHTING_ALPHA_STD, centre_inset, rank_range, ten_crop_views
from pipeline.augment.loading import (
    Batch,
    TrainEpochs,
    checked_labels,
    open_shards,
    to_device,
    torch_device,
)
from pipeline.errors import PipeError
from pipeline.records import PixelStats

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    from nvidia.dali import pipeline_def
    from nvidia.dali.types import DALIDataType, DALIImageType

    DALI_IMPORT_ERROR: str | None = None
except ImportError as e:  # the torch reference path works without DALI
    DALI_IMPORT_ERROR = str(e)

    if not TYPE_CHECKING:  # a stand-in; the type checker sees DALI's own decorator

        def pipeline_def(function):
            return function

READER = "Reader"


# ---------------------------------------------------------------------------------------------------------------
# graph pieces


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
    length = cls.shape(dtype=DALIDataType.INT64)[0]
    padded = fn.pad(fn.cast(cls, dtype=DALIDataType.INT64) - 48, axes=[0], shape=[digits], fill_value=0)
    number = padded[0]
    for i in range(1, digits):
        number = number * 10 + padded[i]
    too_long = length > digits
    label = number // dmath.pow(10, dmath.max(digits - length, 0))
    return label * (1 - too_long) - too_long


def _square(jpegs):
    """(height, width, side, left, top) of each image's central square (as `centre_square`), from the JPEG header."""
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # HWC
    height, width = shape[0], shape[1]
    side = dmath.min(height, width)
    return height, width, side, centre_inset(width, side), centre_inset(height, side)


def _decode(jpegs, device: str):
    # Orientation tags are ignored, as by Pillow and by the shard stage; fancy upsampling matches libjpeg-turbo.
    return fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=DALIImageType.RGB,
                             adjust_orientation=False, jpeg_fancy_upsampling=True)


def _decode_window(jpegs, anchors, crop: int, device: str):
    """Only the crop×crop window at `anchors` ([x, y] per image, int32) decoded: the same pixels as the whole
    image decoded and cropped (libjpeg-turbo and nvJPEG decode the window's MCUs alone)."""
    return fn.decoders.image_slice(jpegs, anchors, np.array([crop, crop], dtype=np.int32), axis_names="WH",
                                   normalized_anchor=False, normalized_shape=False,
                                   device="mixed" if device == "gpu" else "cpu", output_type=DALIImageType.RGB,
                                   adjust_orientation=False, jpeg_fancy_upsampling=True)


def _patch(images, height, width, x, y, crop: int, device: str, mirror=0, mean=(0.0, 0.0, 0.0),
           layout: str = "CHW"):
    """The crop×crop patch whose top-left pixel is (x, y), mirrored if asked, minus `mean`, float32.

    crop_mirror_normalize takes a relative position p and starts at round(p · (W − crop)); p = x / (W − crop)
    lands on x exactly (the float error is far below ½). W = crop leaves one place, x = 0 (hence the max)."""
    pos_x, pos_y = x / dmath.max(width - crop, 1), y / dmath.max(height - crop, 1)
    return fn.crop_mirror_normalize(images, device=device, crop=(crop, crop), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                    mirror=mirror, mean=mean, std=[1.0, 1.0, 1.0], dtype=DALIDataType.FLOAT,
                                    output_layout=layout)


# ---------------------------------------------------------------------------------------------------------------
# the pipelines


@pipeline_def
def train_pipeline(source, *, crop=CROP, device="cpu", channels_last=False, parallel=False, window_decode=True):
    """Training (§4.1): the crop×crop window of each image at the corner `source` gives, decoded alone (with
    `window_decode`; else the whole image, then cut: the same pixels, for `bench/loader.py`), mirrored when it says
    so, minus its pixel mean (float32). Outputs (images CHW, or HWC with `channels_last`, labels)."""
    jpegs, labels, anchors, flips, pixel_means = fn.external_source(
        source=source, num_outputs=5, batch=True, batch_info=True, parallel=parallel,
        dtype=[DALIDataType.UINT8, DALIDataType.INT64, DALIDataType.INT32, DALIDataType.INT32, DALIDataType.FLOAT])
    if window_decode:
        window = _decode_window(jpegs, anchors, crop, device)
    else:
        window = fn.slice(_decode(jpegs, device), anchors, np.array([crop, crop], dtype=np.int32), axis_names="WH",
                          normalized_anchor=False, normalized_shape=False)
    return fn.crop_mirror_normalize(window, device=device, mirror=flips, mean=pixel_means, std=[1.0, 1.0, 1.0],
                                    dtype=DALIDataType.FLOAT, output_layout="HWC" if channels_last else "CHW"), labels


@pipeline_def
def val_pipeline(paths, index_paths, *, mean, shard_id=0, num_shards=1, crop=CROP, label_digits=3, device="cpu"):
    """Test: the centre crop×crop patch of the central square (as `centre_crop_box`), minus the mean."""
    jpegs, labels = _read(paths, index_paths, shard_id, num_shards, label_digits, shuffle=False, pad_last_batch=True)
    _, _, side, left, top = _square(jpegs)
    inset = centre_inset(side, crop)
    anchors = fn.cast(fn.stack(left + inset, top + inset), dtype=DALIDataType.INT32)
    return fn.crop_mirror_normalize(_decode_window(jpegs, anchors, crop, device), device=device,
                                    mean=(255.0 * np.asarray(mean)).tolist(), std=[1.0, 1.0, 1.0],
                                    dtype=DALIDataType.FLOAT, output_layout="CHW"), labels


@pipeline_def
def ten_crop_pipeline(paths, index_paths, *, mean, shard_id=0, num_shards=1, crop=CROP, label_digits=3,
                      device="cpu"):
    """The paper's 10-crop test (§4.1, as `ten_crop_boxes`): the four corner and the centre patches of the central
    square and their mirrors, stacked per image as [10, 3, crop, crop] in `TEN_CROP_VIEWS` order."""
    jpegs, labels = _read(paths, index_paths, shard_id, num_shards, label_digits, shuffle=False, pad_last_batch=True)
    height, width, side, left, top = _square(jpegs)
    images = _decode(jpegs, device)
    mean = (255.0 * np.asarray(mean)).tolist()
    views = [_patch(images, height, width, left + dx, top + dy, crop, device, mirror=int(mirrored), mean=mean)
             for (dx, dy), mirrored in ten_crop_views(side, crop)]
    return fn.stack(*views, axis=0), labels


# ---------------------------------------------------------------------------------------------------------------
# the loaders the trainer and evaluator see: plain torch tensors


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
    """One DALI iteration. On a GPU the outputs are made ready on torch's current stream (`pipe.run(stream)`: DALI
    orders that stream after its own work) instead of host-synchronously: without a stream, `Pipeline.run` blocks
    the host until DALI's own work on the batch is done (DALI's `Pipeline.run` docstring), so the host could not
    queue the next training step meanwhile."""
    return pipe.run(torch.cuda.current_stream(device)) if device.type == "cuda" else pipe.run()


def _placement(device: torch.device) -> dict[str, str | int | None]:
    """The pipeline arguments that say where it runs: its operators' `device` and DALI's `device_id`."""
    on_gpu = device.type == "cuda"
    return {"device": "gpu" if on_gpu else "cpu", "device_id": device.index if on_gpu else None}


class TrainLoader(TrainEpochs):
    """The training batches of one rank: (images float32 [B, 3, crop, crop] on `device`, labels int64 [B]), B the
    per-rank batch, in the computed order of `pipeline.augment.order` (global batch B × world_size).

    `set_epoch(e)` before iterating; `len()` global batches per epoch, the same on every rank and for every rank
    count. `state_dict()` after a batch is {"epoch", "batches" consumed}; after `load_state_dict` of it the next
    iteration starts reading at the next batch: nothing consumed is read or decoded again. `workers` > 0 runs the
    source in that many Python worker processes (DALI's parallel external source); 0 in the calling thread.
    """

    def __init__(self, shard_dir: Path, pixels: PixelStats, batch_size: int, *, crop: int = CROP, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", num_threads: int = 2,
                 lighting: bool = True, mirror: bool = True, random_crop: bool = True, channels_last: bool = False,
                 lighting_alpha_std: float = LIGHTING_ALPHA_STD, workers: int = 0, prefetch: int = 2,
                 window_decode: bool = True):
        _require_dali()
        self._open(shard_dir, pixels, batch_size, crop=crop, seed=seed, rank=rank, world_size=world_size,
                   random_crop=random_crop, mirror=mirror, lighting=lighting, lighting_alpha_std=lighting_alpha_std)
        self.device = torch_device(device)
        self.num_threads, self.workers, self.prefetch = num_threads, workers, prefetch
        self.channels_last, self.crop, self.window_decode = channels_last, crop, window_decode

    def pipeline(self, epoch: int, start: int = 0):
        """The built DALI pipeline of `epoch` on this rank, from global batch `start` on."""
        pipe = train_pipeline(self.source(epoch, start), crop=self.crop, channels_last=self.channels_last,
                              parallel=self.workers > 0, window_decode=self.window_decode,
                              batch_size=self.batch_size, num_threads=self.num_threads,
                              **_placement(self.device), prefetch_queue_depth=self.prefetch, exec_dynamic=True,
                              py_num_workers=max(self.workers, 1), py_start_method="spawn")
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[Batch]:
        start, self._resume_at = self._resume_at, 0
        if start >= len(self):
            return
        pipe = self.pipeline(self.epoch, start)
        try:
            for i in range(start, len(self)):
                images, labels = _run(pipe, self.device)
                images = _dali_to_torch(images, self.device)
                if self.channels_last:  # HWC from DALI: a [B, 3, H, W] view with channels-last strides
                    images = images.permute(0, 3, 1, 2)
                labels = checked_labels(_dali_to_torch(labels, torch.device("cpu")), self.shards)
                self._position = i + 1
                yield images, to_device(labels, self.device)
        finally:
            del pipe


class EvalLoader:
    """Every sample of this rank's part of the shards exactly once, in shard order: (images float32 [B, 3, crop,
    crop], or [B, 10, 3, crop, crop] with `ten_crop`, labels int64 [B]); the last batch may be smaller."""

    def __init__(self, shard_dir: Path, pixels: PixelStats, batch_size: int, *, crop: int = CROP,
                 ten_crop: bool = False, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 num_threads: int = 2,
                 prefetch: int = 2):
        _require_dali()
        self.shards = open_shards(shard_dir, crop=crop, batch_size=batch_size, rank=rank, world_size=world_size)
        self.batch_size, self.rank, self.world_size, self.ten_crop = batch_size, rank, world_size, ten_crop
        self.device = torch_device(device)
        self.num_threads, self.prefetch = num_threads, prefetch
        self.options = {"crop": crop, "label_digits": self.shards.label_digits, "mean": list(pixels.mean)}
        self.samples = len(rank_range(self.shards.samples, rank, world_size))

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size)

    def pipeline(self):
        make = ten_crop_pipeline if self.ten_crop else val_pipeline
        pipe = make(list(self.shards.tars), list(self.shards.indexes), shard_id=self.rank,
                    num_shards=self.world_size, **self.options, batch_size=self.batch_size,
                    num_threads=self.num_threads, **_placement(self.device), seed=0,
                    prefetch_queue_depth=self.prefetch, exec_dynamic=True)
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
                labels = checked_labels(_dali_to_torch(labels, torch.device("cpu"))[:keep], self.shards)
                yield _dali_to_torch(images, self.device)[:keep], to_device(labels, self.device)
        finally:
            del pipe
