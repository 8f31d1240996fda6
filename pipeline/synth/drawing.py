"""Drawing one image of the demo set: its class family (shape, texture, palette, fixed by the label) over a
background with clutter and noise, from a generator seeded by the image's own key."""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.synth.plan import SPLITS, ImageSpec

SHAPES = ("circle", "triangle", "star", "cross", "ring", "square", "heart", "crescent", "arrow", "hexagon",
          "diamond", "pentagon")


TEXTURES = ("shaded", "stripes", "dots", "checker", "rings")


GOLDEN = 0.6180339887498949  # hue step between consecutive classes: well spread for any number of classes


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
