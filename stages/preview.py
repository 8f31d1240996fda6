"""`preview`: a PNG (or JPEG) grid of the first training samples as the network sees them, beside their originals (not
cached: a picture to look at, written atomically)."""

from __future__ import annotations

from pathlib import Path

from pipeline.augment.geometry import CROP
from pipeline.engine import QuietReporter, Reporter, StageResult
from pipeline.errors import PipeError
from pipeline.records import MANIFEST


def run(shard_dir: Path, pca_path: Path, out: Path, *, n: int = 16, seed: int = 0, crop: int = CROP,
        loader: str = "dali", reporter: Reporter | None = None) -> StageResult:
    """The product is the PNG's path."""
    reporter = reporter or QuietReporter()
    for path, what in ((shard_dir / MANIFEST, f"a shard folder ({MANIFEST})"), (pca_path, "pca.json")):
        if not path.is_file():
            raise PipeError(f"{path}: not found; expected {what} from `make prepare`")
    if n < 1:
        raise PipeError(f"expected at least 1 sample, got {n}", option="n")
    if out.is_dir():
        raise PipeError(f"{out}: expected a PNG file to write, found a folder", option="out")
    from pipeline.preview import IMAGE_FORMATS, preview_grid

    if out.suffix.lower() not in IMAGE_FORMATS:
        raise PipeError(f"{out}: expected a file name ending in {', '.join(IMAGE_FORMATS)} (the format it is written "
                        f"in), found {out.suffix or 'no suffix'!r}", option="out")

    written = preview_grid(shard_dir, pca_path, out, n, seed, crop=crop, loader=loader)
    reporter.info(f"preview: {written}")
    return StageResult("preview", out, finished=True, product=written)
