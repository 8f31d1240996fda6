"""WebDataset shards: the seeded assignment of images to shards, shard writing with its DALI index, the manifest,
and verification.

A sample is `<key>.cls` (the global label as ASCII digits), `<key>.jpg` (RGB baseline JPEG, short side 256) and
`<key>.json` (wnid, original size/format, repairs). Tar headers carry no time, owner or host, so the same input and
seed give byte-identical shards whatever the number of workers or array tasks.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.engine import atomic_write, canonical_json, read_json, sha256_file, write_json
from pipeline.errors import PipeError
from pipeline.images import BadImage, prepare_image
from pipeline.records import (
    MANIFEST,
    TIMM_INFO,
    ClassCount,
    Manifest,
    RepairedImage,
    ShardEntry,
    ShardIndex,
    ShardParams,
    ShardUnit,
    SkippedImage,
    TimmInfo,
    TimmSplit,
)
from pipeline.sources import ClassTable, Member

COMPONENTS = ("cls", "jpg", "json")  # in tar order (sorted, as webdataset writes them)
DALI_INDEX_VERSION = "v1.2"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def assign_shards(members: list[Member], shard_size: int, seed: int) -> list[list[Member]]:
    """A seeded shuffle of the whole split cut into `shard_size` pieces, fixed before any work starts: every
    shard mixes classes (DALI's reader only shuffles within a buffer) and any shard can be written alone."""
    if shard_size < 1:
        raise PipeError(f"expected at least 1 sample per shard, got {shard_size}", option="shard_size")
    order = sorted(members, key=lambda m: m.key)
    random.Random(seed).shuffle(order)
    return [order[i : i + shard_size] for i in range(0, len(order), shard_size)]


def cap_members(members: list[Member], classes: list[str], max_classes: int | None, per_class: int | None,
                seed: int) -> list[Member]:
    """A smaller split for short experiments (overfitting shows soonest on few images): the first `max_classes` of
    the source's `classes` (sorted wnids: the same for both splits, so train and val agree) and, of each,
    `per_class` images chosen by a seeded shuffle of its sorted keys. Nothing depends on the listing order, so the
    same source and seed give the same choice."""
    kept = set(classes[:max_classes] if max_classes else {m.wnid for m in members})
    by_class: dict[str, list[Member]] = {}
    for m in sorted(members, key=lambda m: m.key):
        if m.wnid in kept:
            by_class.setdefault(m.wnid, []).append(m)
    chosen = []
    for wnid, group in sorted(by_class.items()):
        if per_class is not None:
            random.Random(f"{seed}:{wnid}").shuffle(group)
        chosen += group[:per_class]
    return chosen


def write_member_list(path: Path, members: Iterable[Member]) -> None:
    with atomic_write(path, "w") as f:
        for m in members:
            f.write(json.dumps(asdict(m)) + "\n")


def read_member_list(path: Path) -> list[Member]:
    return [Member(**json.loads(line)) for line in path.read_text().splitlines()]


@dataclass(frozen=True)
class ShardJob:
    """Everything one worker needs to write one shard (picklable; the member list is read from disk)."""

    out: str
    split: str
    source_root: str
    lists: str  # folder of per-shard member lists written by the index unit
    short_side: int
    quality: int
    labels: tuple[tuple[str, int], ...]  # wnid → global label, for the wnids of this split

    def __call__(self, name: str) -> ShardUnit:
        members = read_member_list(Path(self.lists) / f"{name}.jsonl")
        return write_shard(Path(self.out), name, members, Path(self.source_root), dict(self.labels),
                           short_side=self.short_side, quality=self.quality)


def write_shard(out: Path, name: str, members: list[Member], source_root: Path, label_of: dict[str, int],
                *, short_side: int, quality: int) -> ShardUnit:
    """Write `<name>.tar` and `<name>.idx` atomically; return the unit record (counts, digest, skips, repairs)."""
    skipped: list[SkippedImage] = []
    repaired: list[RepairedImage] = []
    index_lines: list[str] = []
    classes: dict[str, int] = {}  # wnid → samples written
    tar_path = out / f"{name}.tar"
    with atomic_write(tar_path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            try:
                img = prepare_image(m.read(source_root), short_side=short_side, quality=quality)
            except BadImage as e:
                skipped.append(SkippedImage(m.key, m.wnid, m.path, str(e)))
                continue
            except OSError as e:  # strerror only: the exception's own text holds this machine's absolute path
                skipped.append(SkippedImage(m.key, m.wnid, m.path, f"unreadable: {e.strerror or e}"))
                continue
            label = label_of[m.wnid]
            meta = {"key": m.key, "wnid": m.wnid, "label": label, **img.meta}
            parts = {"cls": str(label).encode(), "jpg": img.jpeg, "json": canonical_json(meta).encode()}
            index_lines.append(" ".join(_add_member(tar, f"{m.key}.{ext}", parts[ext]) for ext in COMPONENTS))
            classes[m.wnid] = classes.get(m.wnid, 0) + 1
            if img.meta["repaired"]:
                repaired.append(RepairedImage(m.key, tuple(img.meta["repaired"])))
    samples = len(index_lines)
    record = ShardUnit(f"{name}.tar", samples, 0, None, classes, tuple(skipped), tuple(repaired))
    if samples == 0:  # every image was bad: DALI rejects an index with 0 samples, so no shard (and none listed)
        tar_path.unlink()
        (out / f"{name}.idx").unlink(missing_ok=True)
        return record
    with atomic_write(out / f"{name}.idx", "w") as f:
        f.write(f"{DALI_INDEX_VERSION} {samples}\n" + "".join(line + "\n" for line in index_lines))
    return replace(record, bytes=tar_path.stat().st_size, sha256=sha256_file(tar_path))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> str:
    """Add one file with a fixed header; return its DALI index entry `ext offset size name`."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))
    data_offset = tar.offset - (-(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
    return f"{_split_name(name)[1]} {data_offset} {len(data)} {name}"


def _split_name(name: str) -> tuple[str, str]:
    """(sample key, extension) split at the first dot of the base name, as webdataset and DALI's wds2idx do."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1 :]


def dali_index(tar_path: Path) -> str:
    """The DALI index of a tar as `wds2idx` writes it (regular files, grouped by key, `ext offset size name`)."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isreg():
                continue
            key, ext = _split_name(m.name)
            if not key or key.endswith("/"):
                continue
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    return f"{DALI_INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def build_manifest(split: str, records: list[ShardUnit], classes: ClassTable, index: ShardIndex,
                   params: dict) -> Manifest:
    """The shard set's manifest from its shards' unit records; the images the index lost to a damaged class tar are
    listed before the shards' own skips."""
    counts: dict[str, int] = {}
    for r in records:
        for wnid, n in r.classes.items():
            counts[wnid] = counts.get(wnid, 0) + n
    present = sorted(counts, key=classes.label_of)
    return Manifest(
        split=split,
        params=ShardParams(**params),
        samples=sum(r.samples for r in records),
        bytes=sum(r.bytes for r in records),
        shards=tuple(ShardEntry(r.name, r.samples, r.bytes, r.sha256 or "") for r in records if r.samples),
        classes=tuple(ClassCount(classes.label_of(w), w, classes.names[classes.label_of(w)], counts[w])
                      for w in present),
        num_classes_total=len(classes.wnids),
        skipped=(*index.skipped, *(s for r in records for s in r.skipped)),
        repaired=tuple(s for r in records for s in r.repaired),
        ignored_members=index.ignored,
    )


def shard_paths(shard_dir: Path, manifest: Manifest | None = None) -> list[tuple[Path, Path]]:
    """(tar, idx) of every shard in the manifest, in manifest order (we expand names ourselves; DALI does not)."""
    manifest = manifest or Manifest.read(shard_dir)
    return [(shard_dir / s.name, (shard_dir / s.name).with_suffix(".idx")) for s in manifest.shards]


def damaged_shards(shard_dir: Path, manifest: Manifest) -> list[str]:
    """Shards of the manifest whose tar is missing or not the recorded size, or whose DALI index is missing: the
    cheap check (stat only, no hashing) behind `status`, the up-to-date check and the loaders."""
    damaged = []
    for entry in manifest.shards:
        tar = shard_dir / entry.name
        try:
            intact = tar.stat().st_size == entry.bytes and tar.with_suffix(".idx").stat().st_size > 0
        except FileNotFoundError:
            intact = False
        if not intact:
            damaged.append(entry.name)
    return damaged


def check_shard_files(shard_dir: Path, manifest: Manifest) -> None:
    """Before DALI opens a shard set: a missing or resized shard is one line naming it (DALI's own error is a
    multi-line "Malformed index file")."""
    damaged = damaged_shards(shard_dir, manifest)
    if not damaged:
        return
    entry = next(e for e in manifest.shards if e.name == damaged[0])
    tar = shard_dir / entry.name
    if not tar.is_file():
        found = "no such file"
    elif tar.stat().st_size != entry.bytes:
        found = f"{tar.stat().st_size:,} bytes"
    else:
        found = f"no index {tar.stem}.idx beside it"
    more = f" ({len(damaged) - 1} more shard(s) damaged)" if len(damaged) > 1 else ""
    raise PipeError(f"{tar}: expected a shard of {entry.bytes:,} bytes ({MANIFEST}), found {found}{more}; "
                    f"run `alexnet-pipe verify {shard_dir}`, then rerun `alexnet-pipe shard` to rewrite it")


def verify_shards(shard_dir: Path, *, decode: bool = False,
                  on_shard: Callable[[str], None] | None = None) -> list[str]:
    """Re-read every shard: sha256 and sample count against the manifest, its DALI index against the tar,
    optionally decode every image. Returns the list of problems (empty when the shard set is intact)."""
    from PIL import Image

    problems = []
    for entry in Manifest.read(shard_dir).shards:
        path = shard_dir / entry.name
        idx = path.with_suffix(".idx")
        if not path.is_file():
            problems.append(f"{entry.name}: missing")
        elif (digest := sha256_file(path)) != entry.sha256:
            problems.append(f"{entry.name}: sha256 {digest[:12]}… != manifest {entry.sha256[:12]}…")
        else:
            if not idx.is_file():
                problems.append(f"{idx.name}: missing")
            elif idx.read_text() != dali_index(path):
                problems.append(f"{idx.name}: does not match {entry.name} (rewrite it with wds2idx)")
            with tarfile.open(path) as tar:
                names = tar.getnames()
                samples = len({_split_name(n)[0] for n in names})
                if samples != entry.samples:
                    problems.append(f"{entry.name}: {samples} samples != manifest {entry.samples}")
                if decode:
                    for n in names:
                        if n.endswith(".jpg"):
                            try:
                                data = tar.extractfile(n)
                                assert data is not None, "not a regular file"
                                Image.open(io.BytesIO(data.read())).load()
                            except Exception as e:
                                problems.append(f"{entry.name}/{n}: does not decode ({e})")
        if on_shard:
            on_shard(entry.name)
    return problems


# ---------------------------------------------------------------------------------------------------------------
# metadata other libraries read

def timm_info(manifest: Manifest) -> TimmInfo:
    """The split's entry in timm's `_info.json`."""
    split, shards = manifest.split, manifest.shards
    return TimmInfo(manifest.params.classes, {split: TimmSplit(split, manifest.samples, tuple(s.name for s in shards),
                                                               tuple(s.samples for s in shards))})


def write_timm_info(shard_dir: Path) -> Path:
    """Write `_info.json` beside `manifest.json` (derived from it, so outside the stage's key and `VERSION`)."""
    path = shard_dir / TIMM_INFO
    info = timm_info(Manifest.read(shard_dir)).to_json()
    if not path.is_file() or read_json(path) != info:
        write_json(path, info)
    return path
