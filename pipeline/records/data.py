"""The data stages' products: a shard folder's manifest.json (the single source of truth about a shard set) and
pca.json (exact RGB statistics of every training pixel). Neither holds times, hosts or absolute paths: their hashes
key the stages downstream."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.errors import PipeError
from pipeline.records.base import Record, absent_when_none

MANIFEST = "manifest.json"  # a shard folder's product
TIMM_INFO = "_info.json"  # timm's shard metadata beside it (derived from the manifest)
PCA = "pca.json"  # pca-stats' product


@dataclass(frozen=True)
class ShardParams:
    """The shard stage's params (they key it); defaults for manifests written before a param existed."""

    split: str = ""
    shard_size: int = 1000
    short_side: int = 256
    quality: int = 95
    seed: int = 0
    classes: str = "ilsvrc2012"  # the built-in list, or the name of the --classes file
    max_classes: int | None = absent_when_none()  # a capped split: the first N classes (sorted wnids)
    per_class: int | None = absent_when_none()  # … and at most N images of each, a seeded choice


@dataclass(frozen=True)
class ShardEntry:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ClassCount:
    index: int  # the global label
    wnid: str
    name: str
    samples: int


@dataclass(frozen=True)
class SkippedImage:
    key: str | None  # None: lost with a damaged class tar before it was listed
    wnid: str | None  # None: a zip member whose val label could not be read either
    path: str
    reason: str


@dataclass(frozen=True)
class RepairedImage:
    key: str
    repaired: tuple[str, ...]


@dataclass(frozen=True)
class IgnoredEntry:
    name: str
    reason: str


@dataclass(frozen=True)
class ShardIndex(Record):
    """The shard stage's first unit: the source listed once, and the seeded assignment of its images to shards
    (their member lists lie beside it, one file a shard)."""

    source_root: str  # member paths are relative to it
    shards: int
    sizes: tuple[int, ...]  # images assigned to each shard
    images: int  # kept (a capped split keeps fewer than it lists)
    wnids: tuple[str, ...]
    ignored: tuple[IgnoredEntry, ...]
    skipped: tuple[SkippedImage, ...] = ()  # lost to a damaged class tar while listing
    listed: int | None = None  # None: written before caps existed (then all `images` were kept)
    missing_classes: tuple[str, ...] | None = absent_when_none()  # named by the source, without images here


@dataclass(frozen=True)
class ShardUnit(Record):
    """A written shard's unit record: its file, sample count per class, digest, and the images it skipped or
    repaired. A shard whose every image was bad is not written (DALI rejects an empty index): 0 samples, no
    digest."""

    name: str
    samples: int
    bytes: int
    sha256: str | None
    classes: dict[str, int]  # wnid → samples
    skipped: tuple[SkippedImage, ...]
    repaired: tuple[RepairedImage, ...]


@dataclass(frozen=True)
class Manifest(Record):
    """The single source of truth about a shard set; no times, hosts or absolute paths (its hash keys the stages
    downstream)."""

    split: str
    params: ShardParams
    samples: int
    bytes: int
    shards: tuple[ShardEntry, ...]
    classes: tuple[ClassCount, ...]
    num_classes_total: int = 1000
    skipped: tuple[SkippedImage, ...] = ()
    repaired: tuple[RepairedImage, ...] = ()
    ignored_members: tuple[IgnoredEntry, ...] = ()

    def require_split(self, split: str, folder: Path, option: str | None = None) -> Manifest:
        """This manifest, when it is of `split`'s shards (train shards given as val are refused in one line)."""
        if self.split != split:
            raise PipeError(f"{folder}: expected {split} shards, found split {self.split!r} in its {MANIFEST}",
                            option=option)
        return self

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """A shard folder's manifest (`path` is the folder or the file)."""
        file = path / MANIFEST if path.is_dir() or not path.name.endswith(".json") else path
        if not file.is_file():
            raise PipeError(f"{path}: no {MANIFEST} (expected a finished `alexnet-pipe shard` output folder)")
        try:
            return super().read(file)
        except PipeError as e:  # cut short or edited: the shard stage writes it again from its unit records
            raise PipeError(f"{e}; rerun `alexnet-pipe shard` with the same arguments to write it again (no image "
                            "is sharded again)") from None


@dataclass(frozen=True)
class PixelStats:
    """What the loaders subtract and shift by: the training set's per-channel mean and its RGB eigen-pairs, in
    [0, 1] units (§2, §4.1). From pca.json, or from a checkpoint (the values it trained with)."""

    mean: tuple[float, ...]
    eigvals: tuple[float, ...]
    eigvecs: tuple[tuple[float, ...], ...]  # column i = eigenvector i


@dataclass(frozen=True)
class Pca(Record):
    """pca.json: exact RGB statistics of every training pixel."""

    pixel_scale: str
    pixels: int
    images: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cov: tuple[tuple[float, ...], ...]
    eigvals: tuple[float, ...]
    eigvecs: tuple[tuple[float, ...], ...]
    source_manifest_sha256: str

    @classmethod
    def from_json(cls, data: dict) -> Pca:
        """pca.json; other keys beside its fields (published statistics may carry notes) are passed over."""
        names = {f.name for f in fields(cls)}
        return super().from_json({k: v for k, v in data.items() if k in names} if isinstance(data, dict) else data)

    @classmethod
    def read(cls, path: Path) -> Pca:
        """pca.json (written by pca-stats, or the published values in its format), checked as the lighting
        augmentation relies on it (`pipeline.pca.check_pca`)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PipeError(f"{path}: no such file (expected pca.json from `alexnet-pipe pca-stats`)") from None
        except (OSError, ValueError) as e:
            raise PipeError(f"{path}: not readable as JSON ({e})") from None
        try:
            pca = cls.from_json(data)
        except (ValueError, TypeError) as e:
            names = ", ".join(f.name for f in fields(cls))
            raise PipeError(f"{path}: expected pca.json from `alexnet-pipe pca-stats` (fields {names}), found "
                            f"{type(e).__name__}: {e}") from None
        from pipeline.pca import check_pca  # numpy: only where the statistics are used

        check_pca(pca, path)
        return pca

    @property
    def stats(self) -> PixelStats:
        return PixelStats(self.mean, self.eigvals, self.eigvecs)


@dataclass(frozen=True)
class TimmSplit:
    name: str
    num_samples: int
    filenames: tuple[str, ...]
    shard_lengths: tuple[int, ...]


@dataclass(frozen=True)
class TimmInfo(Record):
    """timm's `_info.json` beside the shards (`timm/data/readers/reader_wds.py` parses exactly these fields), so
    that `timm.data.create_dataset("wds/…", root=DIR, split=SPLIT)` needs no shard list or size."""

    name: str
    splits: dict[str, TimmSplit]
