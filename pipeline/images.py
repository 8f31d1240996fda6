"""One image: sniff its real format from the bytes, repair it to RGB, resize to the short side, encode a JPEG.

We follow what torchvision's ImageFolder sees (`Image.open(f).convert("RGB")`): the ICC profile is ignored and
the EXIF orientation is NOT applied (ImageNet was labelled and is evaluated that way); an orientation tag other
than 1 is recorded in the sample's metadata. Only images that decode completely are ever written, because a
single undecodable sample kills a DALI pipeline.
"""

from __future__ import annotations

import io
import typing
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import SHORT_SIDE

EXIF_ORIENTATION = 0x0112
JPEG_MAX_SIDE = 65_500  # libjpeg's limit on either side of an image it writes
# Decoded pixels one image may take: Pillow's own decompression-bomb threshold (89.5 MP, 268 MB as RGB), the one
# torchvision's ImageFolder reads ImageNet under; JPEGs count after DCT-domain downscaling (`draft`).
DECODE_PIXEL_BUDGET = typing.cast(int, Image.MAX_IMAGE_PIXELS)  # Pillow's default is a number (None: no check)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # grayscale with 16-bit samples (a PNG's)
MAGIC = ((b"GIF8", "GIF"), (b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
         (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"), (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"))


class BadImage(Exception):
    """The bytes are not an image we can decode completely; the reason goes into the manifest's skipped list."""


@dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    meta: dict  # original width/height/format/mode, repairs made, EXIF orientation if any


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side equal to `short_side` and the aspect kept (small images are scaled up)."""
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def prepare_image(data: bytes, *, short_side: int = SHORT_SIDE, quality: int = 95) -> PreparedImage:
    """Decode `data` whatever its real format, convert to RGB, resize (antialiased), re-encode as baseline JPEG.
    Sizes are checked from the header before any pixel is decoded, so memory stays bounded whatever the file."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Possibly corrupt EXIF data" etc. on a few ImageNet files
            img: Image.Image = Image.open(io.BytesIO(data))
            fmt, mode, size = img.format, img.mode, img.size
            orientation = _exif_orientation(img)
            target = resized_size(*size, short_side)
            if max(target) > JPEG_MAX_SIDE:
                raise BadImage(f"too elongated: {size[0]}x{size[1]} at short side {short_side} would be "
                               f"{target[0]}x{target[1]}, over JPEG's {JPEG_MAX_SIDE:,}-pixel limit")
            if fmt == "JPEG":
                # DCT-domain downscaling for large files, keeping at least 2x the target so quality is kept.
                img.draft("RGB" if mode in ("RGB", "YCbCr") else mode, (target[0] * 2, target[1] * 2))
            if img.size[0] * img.size[1] > DECODE_PIXEL_BUDGET:
                raise BadImage(f"too large to decode: {size[0]}x{size[1]} is over the budget of "
                               f"{DECODE_PIXEL_BUDGET:,} pixels")
            img.load()
    except UnidentifiedImageError:
        raise BadImage(f"undecodable: unrecognised image format ({sniff_format(data)})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"undecodable: {type(e).__name__}: {e}") from None

    assert fmt is not None  # Image.open sets the format it recognised
    repairs = []
    if fmt != "JPEG":
        repairs.append(f"{fmt.lower()}→jpeg")
    if img.mode in SIXTEEN_BIT_MODES:  # convert("RGB") would clip 16-bit samples to 255: scale them instead
        repairs.append(f"{mode.lower()}→rgb")  # the mode names the 16 bits
        img = Image.fromarray(_to_8_bits(np.asarray(img))).convert("RGB")
    elif img.mode != "RGB":
        repairs.append(f"{mode.lower()}→rgb")
        img = img.convert("RGB")
    img = img.resize(target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    meta = {"width": size[0], "height": size[1], "format": fmt, "mode": mode, "repaired": repairs}
    if orientation not in (None, 1):
        meta["exif_orientation"] = orientation
    return PreparedImage(out.getvalue(), meta)


def _to_8_bits(samples: np.ndarray) -> np.ndarray:
    """16-bit samples (0..65535) to uint8 by rounding v·255/65535: black stays 0, white becomes 255."""
    wide = np.clip(samples.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def sniff_format(data: bytes) -> str:
    """What a file Pillow cannot identify really is, from its first bytes: stable text for the skip reason."""
    if data[:4] == b"RIFF":
        return f"RIFF/{data[8:12].decode('latin-1').strip() or '?'}".replace("WEBP", "WebP")
    if data[4:8] == b"ftyp":
        return f"ISO media, brand {data[8:12].decode('latin-1').strip()}"
    for magic, name in MAGIC:
        if data.startswith(magic):
            return f"{name} signature, not readable as {name}"
    head = data[:512]
    if head.lstrip().startswith(b"<"):
        return "HTML/XML text"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text"
    return "unknown, starts with " + data[:4].hex(" ")


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block must not cost us the image
        return None
