"""A PNG grid of training samples as the network sees them, beside their originals: how a person checks the
augmentation by eye. Each cell shows the original with its central square (grey) and the crop box (red), the
augmented crop (with the mean added back, so the colours are the image's own plus the lighting shift), and a caption
with the label, the mirror flag and the lighting offset in 0–255 units.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.augment import LOADERS, ReferenceTrainLoader, TrainLoader, centre_square
from pipeline.augment.geometry import CROP
from pipeline.engine import atomic_write
from pipeline.errors import PipeError
from pipeline.records import Manifest, Pca, PixelStats

ORIGINAL_BOX = (300, 224)  # an original is scaled to fit this (w, h)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # the file's suffix names the format it is in
GAP, CAPTION, COLUMNS = 8, 20, 4


@dataclass(frozen=True)
class AugmentedSample:
    """A training sample as the network sees it, with what its augmentation drew."""

    augmented: Any  # float [3, crop, crop], the mean subtracted (a torch tensor)
    label: int
    original: np.ndarray  # uint8 [H, W, 3]
    crop_at: tuple[int, int]  # (left, top)
    mirrored: bool
    offset: np.ndarray  # the lighting offset [3], 0-255 units


def augmented_samples(shard_dir: Path, pixels: PixelStats, n: int, seed: int, crop: int = CROP,
                      loader: str = "dali") -> list[AugmentedSample]:
    """The first n training samples of epoch 0 as the loader makes them, with their augmentation (the draws are
    computed, so the loader's source says what each one was)."""
    from pipeline.augment.reference import decode_rgb

    make = {"dali": TrainLoader, "torch": ReferenceTrainLoader}.get(loader)
    if make is None:
        raise PipeError(f"expected one of {', '.join(LOADERS)}, got {loader!r}", option="loader")
    train = make(shard_dir, pixels, n, crop=crop, seed=seed, num_threads=2 if loader == "dali" else 0)
    train.set_epoch(0)
    images, labels = next(iter(train))
    source = train.source(0)
    samples = []
    for image, i, draw in zip(images, source.positions(0), source.draws(0), strict=True):
        jpg, label, crop_at, flip, pixel_mean = source.sample(int(i), draw)
        offset = 255.0 * np.asarray(pixels.mean, dtype=np.float64) - pixel_mean
        samples.append(AugmentedSample(image, label, decode_rgb(jpg).permute(1, 2, 0).numpy(), crop_at, flip, offset))
    return samples


def preview_grid(shard_dir: Path, pca_path: Path, out_png: Path, n: int = 16, seed: int = 0, *, crop: int = CROP,
                 loader: str = "dali") -> Path:
    """Write a grid of n augmented training samples beside their originals to `out_png`; return its path."""
    pixels = Pca.read(pca_path).stats
    mean = 255.0 * np.asarray(pixels.mean, dtype=np.float32)
    samples = augmented_samples(Path(shard_dir), pixels, n, seed, crop, loader)
    names = {c.index: f"{c.wnid} {c.name}" for c in Manifest.read(Path(shard_dir)).classes}
    font = ImageFont.load_default(size=14)
    cell_w, cell_h = ORIGINAL_BOX[0] + GAP + ORIGINAL_BOX[1], ORIGINAL_BOX[1] + 2 * CAPTION
    rows = -(-n // COLUMNS)
    header = 2 * CAPTION + GAP
    grid = Image.new("RGB", (min(n, COLUMNS) * (cell_w + 2 * GAP), header + rows * (cell_h + 2 * GAP)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((GAP, GAP), f"{Path(shard_dir).name}: training augmentation, seed {seed}, epoch 0. Left: original, "
              "central square (grey), crop box (red). Right: the network's input + the mean.", fill="black",
              font=font)
    draw.text((GAP, GAP + CAPTION), f"Random {crop}x{crop} crop of the central square, mirror p=0.5, PCA lighting "
              "offset = 255 * eigvecs @ (alpha * eigvals), alpha ~ N(0, 0.1); offset in 0-255 units (R, G, B).",
              fill="black", font=font)
    for i, s in enumerate(samples):
        x0 = GAP + (i % COLUMNS) * (cell_w + 2 * GAP)
        y0 = header + GAP + (i // COLUMNS) * (cell_h + 2 * GAP)
        _draw_cell(grid, draw, font, s, names, mean, crop, x0, y0)
    out_png = Path(out_png)
    with atomic_write(out_png) as f:
        grid.save(f, IMAGE_FORMATS.get(out_png.suffix.lower(), "PNG"), quality=95)
    return out_png


def _draw_cell(grid: Image.Image, draw: ImageDraw.ImageDraw, font, s: AugmentedSample, names: dict[int, str],
               mean: np.ndarray, crop: int, x0: int, y0: int) -> None:
    """One sample: its original with the central square and the crop box, the network's input, the caption."""
    original = Image.fromarray(s.original)
    scale = min(ORIGINAL_BOX[0] / original.width, ORIGINAL_BOX[1] / original.height)
    shown = original.resize((max(1, round(original.width * scale)), max(1, round(original.height * scale))),
                            Image.Resampling.BILINEAR)
    grid.paste(shown, (x0, y0))
    left, top, side = centre_square(original.width, original.height)
    draw.rectangle(_scaled((left, top, left + side, top + side), scale, x0, y0), outline=(160, 160, 160),
                   width=1)
    cx, cy = s.crop_at
    draw.rectangle(_scaled((cx, cy, cx + crop, cy + crop), scale, x0, y0), outline=(230, 0, 0), width=2)
    augmented = (s.augmented.permute(1, 2, 0).numpy() + mean).clip(0, 255).round().astype(np.uint8)
    shown = Image.fromarray(augmented).resize((ORIGINAL_BOX[1], ORIGINAL_BOX[1]), Image.Resampling.BILINEAR)
    grid.paste(shown, (x0 + ORIGINAL_BOX[0] + GAP, y0))
    offset = ", ".join(f"{v:+.1f}" for v in s.offset)
    draw.text((x0, y0 + ORIGINAL_BOX[1] + 3), f"{s.label}: {names.get(s.label, '?')}"[:64], fill="black",
              font=font)
    draw.text((x0, y0 + ORIGINAL_BOX[1] + 3 + CAPTION), f"{'MIRRORED' if s.mirrored else 'not mirrored'}   "
              f"crop at ({cx}, {cy})   offset ({offset})", fill="black", font=font)


def _scaled(box: tuple[int, int, int, int], scale: float, x0: int, y0: int) -> tuple[int, int, int, int]:
    return (x0 + round(box[0] * scale), y0 + round(box[1] * scale), x0 + round(box[2] * scale) - 1,
            y0 + round(box[3] * scale) - 1)
