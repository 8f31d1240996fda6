"""The embedded default data set: a generated ImageNet look-alike with ILSVRC-2012's names and conventions.

Each class is a visual family fixed by its sorted-wnid label: an object shape, a fill texture and a two-colour
palette (`class_family`). Every image draws that object near the centre at a random scale, rotation, stretch
and palette jitter, over a smooth multi-colour background with clutter (shapes and lines in random colours),
with pixel noise, sometimes blur, at an ImageNet-like size and JPEG quality. So the class signal survives a
256-short-side resize and a central 224 crop, yet no two images of a class are alike.

Every image is drawn from its own generator seeded by (seed, split, label, index): any image can be made
alone, in any order and in any process, and the same arguments always give byte-identical files (archives
included: fixed tar header fields, gzip mtime 0, a meta.mat header without a date).

Like ImageNet, each split holds one grayscale JPEG, one CMYK JPEG and one PNG saved under a `.JPEG` name; they
take the place of ordinary images, so the counts stay as requested (a split of fewer than three images holds
as many of them as fit).
"""

from __future__ import annotations

import colorsys
import csv
import gzip
import io
import math
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from itertools import groupby
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.errors import PipeError
from pipeline.sources import (
    DEVKIT_GROUND_TRUTH,
    DEVKIT_TAR,
    KAGGLE_VAL_CSV,
    TRAIN_TAR,
    VAL_TAR,
    devkit_id_to_wnid,
    ilsvrc2012_classes,
)

FORMATS = ("tree", "tars")
SPLITS = ("train", "val")
SHAPES = ("circle", "triangle", "star", "cross", "ring", "square", "heart", "crescent", "arrow", "hexagon",
          "diamond", "pentagon")
TEXTURES = ("shaded", "stripes", "dots", "checker", "rings")
QUIRKS = ("grayscale", "cmyk", "png")  # ImageNet's odd files, one of each per split
TAR_MTIME = 1339632000  # 2012-06-14, the ILSVRC-2012 release; any constant keeps archives byte-identical
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created by: alexnet-pipe synth (no date)"
GOLDEN = 0.6180339887498949  # hue step between consecutive classes: well spread for any number of classes
_SEED_VAL_ORDER, _SEED_QUIRKS = 1000, 1001  # stream ids next to the split ids 0 (train) and 1 (val)


@dataclass(frozen=True)
class ClassFamily:
    """What every image of one class shares: shape, fill texture, and the palette's two base hues."""

    shape: str
    texture: str
    hue: float
    second_hue: float

    def describe(self) -> str:
        return f"{_hue_name(self.hue)} {self.shape} with {_hue_name(self.second_hue)} {self.texture} fill"


def class_family(label: int) -> ClassFamily:
    """The family of the class with sorted-wnid `label`; fixed by the label alone (not by the seed)."""
    hue = (label * GOLDEN) % 1.0
    second = (hue + 0.12 + 0.25 * ((label * 7) % 4)) % 1.0
    return ClassFamily(SHAPES[label % len(SHAPES)], TEXTURES[(label + label // len(SHAPES)) % len(TEXTURES)],
                       hue, second)


def synth_image_count(classes: int, train_per_class: int, val_per_class: int) -> int:
    """How many images `generate` writes (train and val together)."""
    _check_counts(classes, train_per_class, val_per_class)
    return classes * (train_per_class + val_per_class)


def generate(out: Path, *, classes: int = 10, train_per_class: int = 100, val_per_class: int = 20,
             seed: int = 0, fmt: str = "tree", progress: Callable[[int], None] | None = None) -> dict:
    """Write the data set into `out` (an existing, empty folder) and return a summary.

    fmt "tree": train/<wnid>/<wnid>_<n>.JPEG, flat val/ILSVRC2012_val_<8 digits>.JPEG, LOC_val_solution.csv
    and LOC_synset_mapping.txt. fmt "tars": the three official archives instead (nested train tar, flat val
    tar, devkit tar.gz with meta.mat and the devkit-ID ground truth). `progress(n)` is called as n images are
    done. An image takes about 4 ms, so one process suffices (about 5 s for the 1,200 default images)."""
    _check_counts(classes, train_per_class, val_per_class)
    if fmt not in FORMATS:
        raise PipeError(f"unknown synth format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:  # one word of every image's generator key
        raise PipeError(f"seed must be an integer in 0..2**32-1, found {seed!r}")
    out = Path(out)
    if not out.is_dir():
        raise PipeError(f"{out}: expected an existing empty folder to generate the data set in")
    if any(out.iterdir()):
        raise PipeError(f"{out}: folder is not empty; synth writes only into an empty folder")

    table = ilsvrc2012_classes()
    wnids = table.wnids[:classes]
    plan = _plan(seed, classes, train_per_class, val_per_class)
    total = len(plan["train"]) + len(plan["val"])
    done = progress or (lambda n: None)
    if fmt == "tree":
        boxes = _write_tree(out, plan, wnids, done)
        _write_val_csv(out / KAGGLE_VAL_CSV, plan["val"], wnids, boxes)
        (out / "LOC_synset_mapping.txt").write_text(
            "".join(f"{w} {n}\n" for w, n in zip(wnids, table.names[:classes], strict=True)))
    else:
        _write_train_tar(out, plan["train"], wnids, done)
        _write_val_tar(out / VAL_TAR, plan["val"], done)
        _write_devkit(out / DEVKIT_TAR, plan["val"], wnids, train_per_class)
    quirk_files = {split: {kind: _file_name(spec, wnids) for kind in QUIRKS for spec in plan[split]
                           if spec.kind == kind} for split in SPLITS}
    return {
        "format": fmt, "seed": seed, "classes": classes, "wnids": list(wnids),
        "train_images": len(plan["train"]), "val_images": len(plan["val"]), "images": total,
        "quirks": [name for split in SPLITS for name in quirk_files[split].values()],
        "quirk_files": quirk_files,
        "families": {w: class_family(i).describe() for i, w in enumerate(wnids)},
    }


def _check_counts(classes: int, train_per_class: int, val_per_class: int) -> None:
    if not isinstance(classes, int) or not 1 <= classes <= 1000:
        raise PipeError(f"classes must be an integer in 1..1000 (the first N ILSVRC-2012 wnids), "
                        f"found {classes!r}")
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if not isinstance(value, int) or value < 1:
            raise PipeError(f"{name} must be an integer >= 1, found {value!r}")


# ------------------------------------------------------------------------------------------------------------
# the plan: which image goes where, decided before any pixel is drawn


@dataclass(frozen=True)
class ImageSpec:
    """One image: its generator key (seed, split, label, index), its file number and how it is encoded."""

    seed: int
    split: str
    label: int
    index: int  # 0-based within (split, label)
    number: int  # train: n of <wnid>_<n>.JPEG; val: the 8-digit number of ILSVRC2012_val_<n>.JPEG
    kind: str = "rgb"  # or one of QUIRKS


def _plan(seed: int, classes: int, train_per_class: int, val_per_class: int) -> dict:
    train = [ImageSpec(seed, "train", c, i, i + 1)
             for c in range(classes) for i in range(train_per_class)]
    pairs = [(c, i) for c in range(classes) for i in range(val_per_class)]
    order = np.random.default_rng([seed, _SEED_VAL_ORDER]).permutation(len(pairs))  # val mixes the classes
    val = [ImageSpec(seed, "val", pairs[j][0], pairs[j][1], n) for n, j in enumerate(order.tolist(), 1)]
    plan = {}
    for split_id, (split, specs) in enumerate((("train", train), ("val", val))):
        picks = np.random.default_rng([seed, _SEED_QUIRKS, split_id]).choice(len(specs), min(3, len(specs)),
                                                                               replace=False)
        for kind, k in zip(QUIRKS, picks.tolist(), strict=False):
            specs[k] = replace(specs[k], kind=kind)
        plan[split] = specs
    return plan


def _file_name(spec: ImageSpec, wnids: tuple[str, ...]) -> str:
    if spec.split == "train":
        return f"{wnids[spec.label]}_{spec.number}.JPEG"
    return f"ILSVRC2012_val_{spec.number:08d}.JPEG"


# ------------------------------------------------------------------------------------------------------------
# writers


def _write_tree(out: Path, plan: dict, wnids, done) -> dict[int, tuple[int, int, int, int]]:
    for wnid in wnids:
        (out / "train" / wnid).mkdir(parents=True)
    for spec, (data, _box) in zip(plan["train"], map(render_file, plan["train"]), strict=True):
        (out / "train" / wnids[spec.label] / _file_name(spec, wnids)).write_bytes(data)
        done(1)
    (out / "val").mkdir()
    boxes = {}
    for spec, (data, box) in zip(plan["val"], map(render_file, plan["val"]), strict=True):
        (out / "val" / _file_name(spec, wnids)).write_bytes(data)
        boxes[spec.number] = box
        done(1)
    return boxes


def _write_val_csv(path: Path, val: list[ImageSpec], wnids, boxes: dict) -> None:
    """Kaggle's LOC_val_solution.csv: `ILSVRC2012_val_00000001,n01751748 111 108 441 375 ` (inclusive box)."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f, lineterminator="\n")
        rows.writerow(["ImageId", "PredictionString"])
        for spec in val:
            rows.writerow([f"ILSVRC2012_val_{spec.number:08d}",
                           " ".join([wnids[spec.label], *map(str, boxes[spec.number])]) + " "])


def _tar_info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = size, TAR_MTIME, 0, 0, "", ""
    info.type, info.mode = (tarfile.DIRTYPE, 0o755) if directory else (tarfile.REGTYPE, 0o644)
    return info


def _write_train_tar(out: Path, train: list[ImageSpec], wnids, done) -> None:
    """A tar of per-class tars, as ImageNet ships it. Each inner tar is built in a temporary file beside the
    archive (memory stays flat) and stored uncompressed: an inner member is a byte range of the outer file."""
    inner_path = out / ".class.tar.partial"
    with tarfile.open(out / TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        images = zip(train, map(render_file, train), strict=True)
        for label, group in groupby(images, key=lambda item: item[0].label):
            with tarfile.open(inner_path, "w", format=tarfile.GNU_FORMAT) as inner:
                for spec, (data, _box) in group:
                    inner.addfile(_tar_info(_file_name(spec, wnids), len(data)), io.BytesIO(data))
                    done(1)
            with open(inner_path, "rb") as f:
                outer.addfile(_tar_info(f"{wnids[label]}.tar", inner_path.stat().st_size), f)
    inner_path.unlink()


def _write_val_tar(path: Path, val: list[ImageSpec], done) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for spec, (data, _box) in zip(val, map(render_file, val), strict=True):
            tar.addfile(_tar_info(f"ILSVRC2012_val_{spec.number:08d}.JPEG", len(data)), io.BytesIO(data))
            done(1)


def _write_devkit(path: Path, val: list[ImageSpec], wnids, train_per_class: int) -> None:
    """ILSVRC2012_devkit_t12.tar.gz: data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt, whose
    line i is the devkit ID (meta.mat order, not the sorted label) of ILSVRC2012_val_<i>."""
    wnid_to_devkit_id = {w: i for i, w in devkit_id_to_wnid().items()}
    truth = "".join(f"{wnid_to_devkit_id[wnids[spec.label]]}\n" for spec in val).encode()
    files = [(f"{DEVKIT_DIR}/data/meta.mat", meta_mat(set(wnids), train_per_class)),
             (f"{DEVKIT_DIR}/data/{DEVKIT_GROUND_TRUTH}", truth)]
    with open(path, "wb") as raw, gzip.GzipFile(path.name[:-3], "wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for folder in (DEVKIT_DIR, f"{DEVKIT_DIR}/data"):
            tar.addfile(_tar_info(folder + "/", directory=True))
        for name, data in files:
            tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def meta_mat(present: set[str], train_per_class: int) -> bytes:
    """The devkit's data/meta.mat: a (1000, 1) struct array `synsets` of the leaf classes in devkit-ID order,
    with the real file's fields and types (so `loadmat(squeeze_me=True)["synsets"]["ILSVRC2012_ID"]` reads
    ints and `["WNID"]` strings). The gloss names the class's generated family; num_train_images counts this
    data set."""
    from scipy.io import savemat

    table = ilsvrc2012_classes()
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")
    synsets = np.empty((1000, 1), dtype=[(f, object) for f in fields])
    for row, (devkit_id, wnid) in enumerate(sorted(devkit_id_to_wnid().items())):
        label = table.label_of(wnid)
        synsets[row, 0] = (np.array([[devkit_id]], np.uint16), np.array([wnid]),
                           np.array([table.names[label]]),
                           np.array([f"generated image family: {class_family(label).describe()}"]),
                           np.array([[0]], np.uint8), np.zeros((1, 0), np.uint8), np.array([[0]], np.uint8),
                           np.array([[train_per_class if wnid in present else 0]], np.uint16))
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    data = bytearray(buf.getvalue())
    data[:116] = MAT_HEADER.ljust(116)  # scipy writes the creation time here
    return bytes(data)


# ------------------------------------------------------------------------------------------------------------
# one image


def render_file(spec: ImageSpec) -> tuple[bytes, tuple[int, int, int, int]]:
    """The file bytes of one image and its object's box (xmin, ymin, xmax, ymax, inclusive)."""
    image, box, quality = render_image(spec)
    buf = io.BytesIO()
    if spec.kind == "png":  # like n02105855_2933.JPEG: a PNG with alpha behind a .JPEG name
        image.convert("RGBA").save(buf, "PNG")
    elif spec.kind == "cmyk":
        image.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif spec.kind == "grayscale":
        image.convert("L").save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), box


def render_image(spec: ImageSpec) -> tuple[Image.Image, tuple[int, int, int, int], int]:
    """Draw one image from its own generator: (RGB image, object box, JPEG quality)."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(spec.split), spec.label, spec.index])
    width, height = image_size(rng)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    for _ in range(int(rng.integers(3, 10))):
        _clutter_item(rng, draw, width, height, short * 0.28)
    box = _draw_object(rng, image, class_family(spec.label), width, height)
    for _ in range(int(rng.integers(0, 3))):  # a few small things in front of the object
        _clutter_item(rng, draw, width, height, short * 0.1)
    image = _add_noise(rng, image)
    if rng.random() < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.5))))
    return image, box, int(rng.integers(75, 96))


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """ImageNet-like (width, height): most 500x375 or 500x333 landscape, some portrait or square, the rest
    spread over short sides 150..800 and aspects 1..1.8."""
    width: float
    height: float
    u = rng.random()
    if u < 0.55:
        width, height = (500, 375) if rng.random() < 0.7 else (500, 333)
    elif u < 0.7:
        width, height = (375, 500) if rng.random() < 0.7 else (333, 500)
    elif u < 0.78:
        width = height = int(rng.integers(200, 601))
    else:
        short = math.exp(rng.uniform(math.log(150), math.log(800)))
        long = min(short * rng.uniform(1.0, 1.8), 1200.0)
        width, height = (long, short) if rng.random() < 0.75 else (short, long)
    return round(width), round(height)


def _hsv(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return _hsv(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.2, 1.0))


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth multi-colour field: a random 2x2..4x4 grid of muted colours, bilinearly stretched."""
    grid = int(rng.integers(2, 5))
    colours = [_hsv(rng.random(), rng.uniform(0.0, 0.55), rng.uniform(0.25, 0.95))
               for _ in range(grid * grid)]
    small = Image.fromarray(np.array(colours, np.uint8).reshape(grid, grid, 3))
    return small.resize((width, height), Image.Resampling.BILINEAR)


def _clutter_item(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int,
                  size: float) -> None:
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    rx, ry = rng.uniform(0.15, 1.0, 2) * size
    colour = _random_colour(rng)
    kind = int(rng.integers(0, 5))
    if kind == 0:
        angle = rng.uniform(0, math.pi)
        dx, dy = 2 * rx * math.cos(angle), 2 * rx * math.sin(angle)
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=colour, width=max(1, round(ry / 6)))
    elif kind == 1:
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=colour)
    elif kind == 2:
        draw.rectangle([x - rx, y - ry, x + rx, y + ry], fill=colour)
    elif kind == 3:  # another family's shape, small and plain: shape alone does not name the class
        outline, _holes = _shape(SHAPES[int(rng.integers(0, len(SHAPES)))])
        angle = rng.uniform(0, 2 * math.pi)
        cos, sin = math.cos(angle) * rx * 0.6, math.sin(angle) * rx * 0.6
        draw.polygon([(x + px * cos - py * sin, y + px * sin + py * cos) for px, py in outline.tolist()],
                     fill=colour)
    else:
        corners = int(rng.integers(3, 7))
        angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
        radii = rng.uniform(0.4, 1.0, corners) * rx
        draw.polygon([(x + r * math.cos(a), y + r * math.sin(a)) for a, r in zip(angles, radii, strict=True)],
                     fill=colour)


def _draw_object(rng: np.random.Generator, image: Image.Image, family: ClassFamily, width: int,
                 height: int) -> tuple[int, int, int, int]:
    """The class's object near the centre, filled with its texture in its palette; returns its (inclusive)
    box."""
    short = min(width, height)
    radius = short * rng.uniform(0.24, 0.38)
    cx = width / 2 + rng.normal(0, 0.06 * short)
    cy = height / 2 + rng.normal(0, 0.06 * short)
    angle, stretch = rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.25)
    cos, sin = math.cos(angle), math.sin(angle)
    outline, holes = _shape(family.shape)

    def place(points: np.ndarray) -> np.ndarray:  # unit shape → image coordinates
        x, y = points[:, 0] * stretch * radius, points[:, 1] / stretch * radius
        return np.stack([cx + x * cos - y * sin, cy + x * sin + y * cos], axis=1)

    outer = place(outline)
    x0, y0 = np.floor(outer.min(axis=0)).astype(int)
    x1, y1 = np.ceil(outer.max(axis=0)).astype(int) + 1
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    mask_draw = ImageDraw.Draw(mask)
    mask_draw.polygon([tuple(p) for p in (outer - (x0, y0)).tolist()], fill=255)
    for hole in holes:
        mask_draw.polygon([tuple(p) for p in (place(hole) - (x0, y0)).tolist()], fill=0)

    main = np.array(_hsv(family.hue + rng.normal(0, 0.015), rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0)),
                    np.float32)
    second = np.array(_hsv(family.second_hue + rng.normal(0, 0.015), rng.uniform(0.5, 1.0),
                           rng.uniform(0.3, 0.9)), np.float32)
    ys, xs = np.ogrid[y0 - cy:y1 - cy, x0 - cx:x1 - cx]
    u = (xs * cos + ys * sin).astype(np.float32)  # object frame: the texture turns with the object
    v = (ys * cos - xs * sin).astype(np.float32)
    t = _texture(rng, family.texture, u, v, radius)
    fill = main + t[..., None] * (second - main)
    image.paste(Image.fromarray(fill.astype(np.uint8)), (int(x0), int(y0)), mask)
    bx0, by0, bx1, by1 = mask.getbbox() or (0, 0, 1, 1)
    return (max(0, int(x0) + bx0), max(0, int(y0) + by0), min(width - 1, int(x0) + bx1 - 1),
            min(height - 1, int(y0) + by1 - 1))


def _texture(rng: np.random.Generator, texture: str, u: np.ndarray, v: np.ndarray,
             radius: float) -> np.ndarray:
    """0..1 per pixel: 0 = the palette's main colour, 1 = its second colour."""
    period = radius * rng.uniform(0.3, 0.5)
    phase = rng.uniform(0, 2 * math.pi)
    if texture == "shaded":
        return np.clip(0.5 + 0.6 * (u + v * rng.uniform(-0.5, 0.5)) / radius, 0.0, 1.0)
    if texture == "stripes":
        return (np.sin(u * (2 * math.pi / period) + phase) > 0).astype(np.float32)
    if texture == "dots":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return (du * du + dv * dv < (0.32 * period) ** 2).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    return (np.sin(np.sqrt(u * u + v * v) * (2 * math.pi / period) + phase) > 0).astype(np.float32)


def _add_noise(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    amplitude = int(rng.integers(2, 11))
    noise = rng.integers(-amplitude, amplitude + 1, (image.height, image.width, 3), dtype=np.int16)
    pixels = np.asarray(image, dtype=np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@cache
def _shape(name: str) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """A unit-radius shape centred on 0: its outline and the holes cut out of it."""
    def regular(corners: int, start: float = -math.pi / 2) -> np.ndarray:
        a = start + np.arange(corners) * (2 * math.pi / corners)
        return np.stack([np.cos(a), np.sin(a)], axis=1)

    if name == "circle":
        return regular(48), ()
    if name == "ring":
        return regular(48), (0.55 * regular(48),)
    if name == "crescent":
        return regular(48), (0.85 * regular(48) + (0.45, -0.1),)
    if name in ("triangle", "square", "pentagon", "hexagon"):
        return regular({"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[name],
                       -math.pi / 4 if name == "square" else -math.pi / 2), ()
    if name == "star":
        points = regular(10)
        points[1::2] *= 0.42
        return points, ()
    if name == "diamond":
        return np.array([(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]), ()
    if name == "cross":
        a = 0.3
        return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
                         (-1, a), (-1, -a), (-a, -a)], dtype=float), ()
    if name == "arrow":
        return np.array([(-1, -0.22), (0.2, -0.22), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.22), (-1, 0.22)],
                        dtype=float), ()
    if name == "heart":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], axis=1) / 16.5, ()
    raise ValueError(f"unknown shape {name!r}")


_HUE_NAMES = ((0.04, "red"), (0.10, "orange"), (0.18, "yellow"), (0.27, "lime"), (0.42, "green"),
              (0.52, "teal"), (0.58, "cyan"), (0.70, "blue"), (0.79, "violet"), (0.90, "magenta"),
              (0.97, "pink"), (1.01, "red"))


def _hue_name(hue: float) -> str:
    return next(name for limit, name in _HUE_NAMES if hue % 1.0 < limit)
