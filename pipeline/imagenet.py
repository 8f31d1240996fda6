"""ImageNet label tables: the 1,000 ILSVRC-2012 wnids in sorted order (the global label order) and the devkit IDs.

Labels are always the index of the wnid in `LOC_synset_mapping.txt` order (= sorted wnids = torchvision's
ImageFolder on full ImageNet = Keras), also for a subset of classes. The devkit's
`ILSVRC2012_validation_ground_truth.txt` holds *devkit IDs* (meta.mat order), which are NOT sorted indices:
ID 1 is n02119789 (sorted index 278).
"""

from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import IO

from pipeline.errors import PipeError


@dataclass(frozen=True)
class ClassTable:
    """Wnids in label order, with their human-readable names."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]

    @cache  # noqa: B019 - tables are few and immutable
    def index(self) -> dict[str, int]:
        return {wnid: i for i, wnid in enumerate(self.wnids)}

    def label_of(self, wnid: str) -> int:
        try:
            return self.index()[wnid]
        except KeyError:
            raise PipeError(f"wnid {wnid!r} is not in the class list ({len(self.wnids)} classes)") from None


def parse_synset_mapping(text: str, source: str) -> ClassTable:
    """Parse `LOC_synset_mapping.txt` lines: `n01440764 tench, Tinca tinca`, in label order."""
    wnids, names = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not (wnid.startswith("n") and wnid[1:].isdigit()):
            raise PipeError(f"{source}:{lineno}: expected 'nXXXXXXXX name', found {line!r}")
        wnids.append(wnid)
        names.append(name.strip())
    if len(set(wnids)) != len(wnids):
        raise PipeError(f"{source}: the class list repeats a wnid")
    return ClassTable(tuple(wnids), tuple(names))


@cache
def ilsvrc2012_classes() -> ClassTable:
    """The 1,000 ILSVRC-2012 classes in sorted-wnid order (shipped with the package)."""
    text = resources.files("pipeline").joinpath("data/LOC_synset_mapping.txt").read_text()
    return parse_synset_mapping(text, "LOC_synset_mapping.txt")


def load_classes(path: Path | None = None) -> ClassTable:
    """`--classes FILE` (same format as LOC_synset_mapping.txt) or the ILSVRC-2012 list."""
    if path is None:
        return ilsvrc2012_classes()
    if not path.is_file():
        raise PipeError(f"class list not found: {path} (expected a LOC_synset_mapping.txt-style file)")
    return parse_synset_mapping(path.read_text(), str(path))


@cache
def devkit_id_to_wnid() -> dict[int, str]:
    """ILSVRC2012_ID (1..1000, the devkit's meta.mat order) → wnid, from the shipped `map_clsloc.txt`."""
    text = resources.files("pipeline").joinpath("data/map_clsloc.txt").read_text()
    mapping = {}
    for line in text.splitlines():
        if line.strip():
            wnid, devkit_id, _name = line.split(" ", 2)
            mapping[int(devkit_id)] = wnid
    return mapping


# ---------------------------------------------------------------------------------------------------------------
# sources: an extracted tree or the official archives, never extracted to disk

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass(frozen=True)
class Member:
    """One image of the source: its key (file stem), wnid and where its bytes are.

    `path` is relative to the source root; for an archive member, `offset`/`size` give the byte range of its
    data inside that (outer) archive file, so a worker seeks and reads only its own images."""

    key: str
    wnid: str
    path: str
    offset: int = -1
    size: int = -1

    def read(self, root: Path) -> bytes:
        full = root / self.path
        if self.offset < 0:
            return full.read_bytes()
        with open(full, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path} ended inside this member")
        return data


@dataclass
class SourceListing:
    root: Path  # member paths are relative to it
    members: list[Member]
    ignored: list[dict]  # unsafe or non-file archive members, unlabelled or misplaced files: {name, reason}
    skipped: list[dict] = field(default_factory=list)  # images lost to a damaged class tar: {key, wnid, path, reason}


@dataclass(frozen=True)
class Layout:
    """Where a split lives in SOURCE: an `archive` (tar) or a `tree` (folder), the val labels it needs (None when
    class folders or nested class tars name the wnids), and the folder member paths are relative to."""

    kind: str
    path: Path
    root: Path
    labels: Path | None


def find_layout(source: Path, split: str, labels: Path | None = None) -> Layout:
    """Which of the supported layouts SOURCE is, without reading any image; raises a PipeError that says what was
    expected when it is none of them or when val labels are needed and not found."""
    source = source.resolve()
    official_tar = source / (TRAIN_TAR if split == "train" else VAL_TAR)
    if source.is_dir() and official_tar.is_file():
        return _archive_layout(official_tar, split, labels or _find_val_labels(source, split))
    if source.is_dir() and (source / split).is_dir():
        return _tree_layout(source / split, split, labels or _find_val_labels(source, split), source)
    if source.is_file() and tarfile.is_tarfile(source):
        return _archive_layout(source, split, labels or _find_val_labels(source.parent, split))
    if source.is_dir() and any(_is_wnid(p.name) and p.is_dir() for p in source.iterdir()):
        return Layout("tree", source, source, None)
    if source.is_dir() and split == "val" and any(_is_image(p) for p in source.iterdir()):
        return _tree_layout(source, split, labels or _find_val_labels(source, split)
                            or _find_val_labels(source.parent, split), source)
    raise PipeError(
        f"{source}: no ImageNet {split} split found. Expected one of: a folder holding {official_tar.name} "
        f"(official archives), a folder holding {split}/ (extracted tree), a {split} .tar archive, a folder "
        f"of <wnid>/ class folders{', or a flat folder of ILSVRC2012_val_*.JPEG' if split == 'val' else ''}")


def list_source(source: Path, split: str, labels: Path | None = None) -> SourceListing:
    """Find `split` in SOURCE, whatever its layout, and list its images with their wnids."""
    layout = find_layout(source, split, labels)
    if layout.kind == "archive":
        return _list_archive(layout.path, split, layout.labels)
    return _list_tree(layout.path, split, layout.labels, layout.root)


def _archive_layout(archive: Path, split: str, labels: Path | None) -> Layout:
    with open(archive, "rb") as f:
        magic = f.read(6)
    compression = next((name for sig, name in COMPRESSED_MAGIC.items() if magic.startswith(sig)), None)
    if compression:
        raise PipeError(f"{archive}: a {compression}-compressed archive; images are read as byte ranges of an "
                        f"uncompressed tar, so decompress it first (the official ImageNet tars are uncompressed)")
    if split == "val" and labels is None:
        raise PipeError(_no_val_labels(archive))
    return Layout("archive", archive, archive.parent, labels)


def _tree_layout(folder: Path, split: str, labels: Path | None, root: Path) -> Layout:
    if any(p.is_dir() and _is_wnid(p.name) for p in folder.iterdir()):  # train/<wnid>/… or val in valprep.sh layout
        return Layout("tree", folder, root, None)
    if split == "train":
        raise PipeError(f"{folder}: expected train/<wnid>/*.JPEG class folders, found none")
    if labels is None:
        raise PipeError(_no_val_labels(folder))
    return Layout("tree", folder, root, labels)


def _no_val_labels(where: Path) -> str:
    return (f"{where}: val labels not found; pass --labels with {KAGGLE_VAL_CSV}, {DEVKIT_TAR} or "
            f"{DEVKIT_GROUND_TRUTH}, or put one beside the val images")


def _is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _find_val_labels(folder: Path, split: str) -> Path | None:
    if split != "val":
        return None
    for name in (KAGGLE_VAL_CSV, DEVKIT_TAR, DEVKIT_GROUND_TRUTH):
        if (folder / name).is_file():
            return folder / name
    return None


def _list_tree(folder: Path, split: str, labels: Path | None, root: Path) -> SourceListing:
    """A symlinked file is read through its link (reading cannot write outside OUT); a name that looks like an image
    but is no regular file (a dangling link, a fifo), a folder that is not a wnid and a file where no image belongs
    are listed as ignored, never dropped without a word."""
    members, ignored = [], []

    def ignore(p: Path, reason: str) -> None:
        ignored.append({"name": str(p.relative_to(root)) + ("/" if p.is_dir() else ""), "reason": reason})

    def looks_like_image(f: Path) -> bool:
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            if f != labels:
                ignore(f, "a folder where only images belong" if f.is_dir() else
                       f"not an image file name (expected {', '.join(IMAGE_SUFFIXES)})")
            return False
        if not f.is_file():
            ignore(f, "not a regular file")
            return False
        return True

    entries = sorted(folder.iterdir())
    class_dirs = [p for p in entries if p.is_dir() and _is_wnid(p.name)]
    if class_dirs:
        for p in entries:
            if p not in class_dirs and p != labels:
                ignore(p, "not a wnid class folder (expected nXXXXXXXX/)" if p.is_dir() else
                       "a file beside the class folders")
        for d in class_dirs:
            for f in sorted(d.iterdir()):
                if looks_like_image(f):
                    members.append(Member(f.stem, d.name, str(f.relative_to(root))))
        return SourceListing(root, members, ignored)
    truth = _val_ground_truth(labels, folder)
    for f in entries:
        if not looks_like_image(f):
            continue
        if f.stem in truth:
            members.append(Member(f.stem, truth[f.stem], str(f.relative_to(root))))
        else:
            ignored.append({"name": f.name, "reason": "no label in " + labels.name})
    return SourceListing(root, members, ignored)


def _list_archive(archive: Path, split: str, labels: Path | None) -> SourceListing:
    """Index an official archive by reading tar headers only (tarfile seeks over member data). Directory members
    are passed over; links, devices, names that would leave a folder and members that are no image are listed as
    ignored. A damaged class tar loses only what follows the damage (listed as skipped); the split goes on."""
    listing = SourceListing(archive.parent, [], [])
    truth = _val_ground_truth(labels, archive) if split == "val" else {}
    try:
        with open(archive, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
            for m in outer:
                if m.isdir():
                    continue
                reason = _unsafe(m)
                if reason:
                    listing.ignored.append({"name": m.name, "reason": reason})
                    continue
                name = PurePosixPath(m.name)
                if name.suffix == ".tar":  # the train tar: one uncompressed tar per class
                    _list_class_tar(f, m, archive, listing)
                    f.seek(m.offset_data + m.size)  # the inner listing moved the shared file position
                elif name.suffix.lower() in IMAGE_SUFFIXES:
                    key = name.stem
                    wnid = truth.get(key) if split == "val" else name.parent.name
                    if wnid is None or (split == "train" and not _is_wnid(wnid)):
                        listing.ignored.append({"name": m.name, "reason": "no label"})
                        continue
                    listing.members.append(Member(key, wnid, archive.name, m.offset_data, m.size))
                else:
                    listing.ignored.append({"name": m.name, "reason": "neither an image nor a class tar"})
    except tarfile.TarError as e:
        raise PipeError(f"{archive}: not a readable tar archive ({e})") from None
    listing.members.sort(key=lambda m: m.key)
    return listing


def _list_class_tar(f: IO[bytes], m: tarfile.TarInfo, archive: Path, listing: SourceListing) -> None:
    """The members of one inner class tar (bytes [offset_data, +size) of the train tar). A member cut short, or a
    header that cannot be read, ends this class tar only: what came before is kept, the rest listed as skipped."""
    wnid = PurePosixPath(m.name).stem
    kept = 0
    try:
        with tarfile.open(fileobj=_ByteRange(f, m.offset_data, m.size), mode="r:") as inner:
            for im in inner:
                if im.offset_data + im.size > m.size:
                    raise tarfile.ReadError(f"member {im.name} ends {im.offset_data + im.size - m.size} bytes "
                                            "past the end of the class tar")
                reason = None if im.isdir() else _unsafe(im)
                if reason:
                    listing.ignored.append({"name": f"{m.name}/{im.name}", "reason": reason})
                elif PurePosixPath(im.name).suffix.lower() in IMAGE_SUFFIXES:
                    listing.members.append(Member(PurePosixPath(im.name).stem, wnid, archive.name,
                                                  m.offset_data + im.offset_data, im.size))
                    kept += 1
                elif not im.isdir():
                    listing.ignored.append({"name": f"{m.name}/{im.name}", "reason": "not an image file name"})
            end = inner.offset  # where tarfile stopped: the end-of-archive blocks, or a header it could not read
            if _ByteRange(f, m.offset_data + end, min(tarfile.BLOCKSIZE, m.size - end)).read().strip(b"\0"):
                raise tarfile.ReadError(f"unreadable member header at byte {end}")
    except tarfile.TarError as e:
        listing.skipped.append({"key": None, "wnid": wnid, "path": f"{archive.name}/{m.name}",
                                "reason": f"damaged class tar {m.name} ({e}): the rest of it is lost, "
                                          f"{kept} complete images before the damage kept"})


def _unsafe(m: tarfile.TarInfo) -> str | None:
    """Archive members are never written to disk by name; still, list anything a hostile archive could hold."""
    if m.issym():
        return f"symbolic link to {m.linkname} (not followed)"
    if m.islnk():
        return f"hard link to {m.linkname} (not followed)"
    if m.ischr() or m.isblk():
        return "device file"
    if not m.isfile():
        return "not a regular file (fifo or special member)"
    name = PurePosixPath(m.name)
    if name.is_absolute() or ".." in name.parts:
        return "unsafe path (absolute or ..)"
    return None


class _ByteRange(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start+size) of an open file (an inner tar of the train tar)."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: pos, io.SEEK_CUR: self.pos + pos, io.SEEK_END: self.size + pos}[whence]
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


# ---------------------------------------------------------------------------------------------------------------
# validation labels

def _val_ground_truth(labels: Path | None, where: Path) -> dict[str, str]:
    """val file stem → wnid, from Kaggle's LOC_val_solution.csv, the devkit tar.gz or its ground-truth txt."""
    if labels is None:
        raise PipeError(f"{where}: val labels not found; pass --labels with {KAGGLE_VAL_CSV}, {DEVKIT_TAR} "
                        f"or {DEVKIT_GROUND_TRUTH}")
    if not labels.is_file():
        raise PipeError(f"labels file not found: {labels}")
    if labels.name.endswith(".csv"):
        return _parse_kaggle_csv(labels)
    if labels.name.endswith((".tar.gz", ".tgz")):
        ids, meta = _read_devkit(labels)
        return _devkit_truth(ids, meta, labels)
    return _devkit_truth(labels.read_text(), None, labels)


def _parse_kaggle_csv(path: Path) -> dict[str, str]:
    truth = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != ["ImageId", "PredictionString"]:
            raise PipeError(f"{path}: expected the header 'ImageId,PredictionString', found {header}")
        for row in rows:
            if len(row) < 2 or not row[1].split():
                raise PipeError(f"{path}: line {rows.line_num}: expected 'ImageId,wnid x y x y …', found {row}")
            truth[row[0]] = row[1].split()[0]
    return truth


def _read_devkit(devkit: Path) -> tuple[str, bytes | None]:
    ids = meta = None
    with tarfile.open(devkit, "r:gz") as t:
        for m in t:
            if m.isfile() and m.name.endswith("/" + DEVKIT_GROUND_TRUTH):
                ids = t.extractfile(m).read().decode()
            elif m.isfile() and m.name.endswith("/meta.mat"):
                meta = t.extractfile(m).read()
    if ids is None:
        raise PipeError(f"{devkit}: no data/{DEVKIT_GROUND_TRUTH} inside the devkit archive")
    return ids, meta


def _devkit_truth(ids_text: str, meta_mat: bytes | None, source: Path) -> dict[str, str]:
    """Line i of the ground truth is the devkit ID of ILSVRC2012_val_<i>; devkit IDs are meta.mat order."""
    id_to_wnid = _meta_mat_ids(meta_mat) if meta_mat else devkit_id_to_wnid()
    truth = {}
    for i, line in enumerate(ids_text.split(), 1):
        try:
            truth[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[int(line)]
        except (ValueError, KeyError):
            raise PipeError(f"{source}: line {i}: expected a devkit ID 1..1000, found {line!r}") from None
    return truth


def _meta_mat_ids(meta_mat: bytes) -> dict[int, str]:
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    return {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], strict=True) if int(i) <= 1000}
