"""One image: sniff its real format from the bytes, repair it to RGB, resize to the short side, encode a JPEG.

We follow what torchvision's ImageFolder sees (`Image.open(f).convert("RGB")`): the ICC profile is ignored and
the EXIF orientation is NOT applied (ImageNet was labelled and is evaluated that way); an orientation tag other
than 1 is recorded in the sample's metadata. Only images that decode completely are ever written, because a
single undecodable sample kills a DALI pipeline.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

EXIF_ORIENTATION = 0x0112


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


def prepare_image(data: bytes, *, short_side: int = 256, quality: int = 95) -> PreparedImage:
    """Decode `data` whatever its real format, convert to RGB, resize (antialiased), re-encode as baseline JPEG."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Possibly corrupt EXIF data" etc. on a few ImageNet files
            img = Image.open(io.BytesIO(data))
            fmt, mode, size = img.format, img.mode, img.size
            orientation = _exif_orientation(img)
            target = resized_size(*size, short_side)
            if fmt == "JPEG":
                # DCT-domain downscaling for large files, keeping at least 2x the target so quality is kept.
                img.draft("RGB" if mode in ("RGB", "YCbCr") else mode, (target[0] * 2, target[1] * 2))
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"undecodable: {type(e).__name__}: {e}") from None

    repairs = []
    if fmt != "JPEG":
        repairs.append(f"{fmt.lower()}→jpeg")
    if img.mode != "RGB":
        repairs.append(f"{mode.lower()}→rgb")
        img = img.convert("RGB")
    img = img.resize(target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    meta = {"width": size[0], "height": size[1], "format": fmt, "mode": mode, "repaired": repairs}
    if orientation not in (None, 1):
        meta["exif_orientation"] = orientation
    return PreparedImage(out.getvalue(), meta)


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block must not cost us the image
        return None
