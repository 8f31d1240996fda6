"""ImageNet label tables (the 1,000 ILSVRC-2012 wnids in sorted order, the global label order, and the devkit IDs)
and ImageNet sources: ILSVRC-2012 (official tars or an extracted tree) and Tiny ImageNet-200 (the extracted folder or
the official zip), each read as downloaded.

Labels are always the index of the wnid in `LOC_synset_mapping.txt` order (= sorted wnids = torchvision's
ImageFolder on full ImageNet = Keras), also for a subset of classes. The devkit's
`ILSVRC2012_validation_ground_truth.txt` holds *devkit IDs* (meta.mat order), which are NOT sorted indices:
ID 1 is n02119789 (sorted index 278).
"""

from __future__ import annotations

import csv
import io
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field, replace
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
# Tiny ImageNet-200 (CS231n): 64x64 photos of 200 ILSVRC-2012 classes, as the extracted tiny-imagenet-200/ or its zip
TINY_WNIDS = "wnids.txt"
TINY_ZIP = "tiny-imagenet-200.zip"
TINY_VAL_ANNOTATIONS = "val_annotations.txt"
ZIP_MAGIC = b"PK\x03\x04"
ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature … name length, extra length: 30 bytes before the name
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass(frozen=True)
class Member:
    """One image of the source: its key (file stem), wnid and where its bytes are.

    `path` is relative to the source root; for an archive member, `offset`/`size` give the byte range of its
    data inside that (outer) archive file, so a worker seeks and reads only its own images. A zip member may be
    deflated: then those bytes inflate to `inflated_size` bytes, in the worker that reads them (the listing never
    decompresses an image); a zip member's CRC-32 is checked after reading."""

    key: str
    wnid: str
    path: str
    offset: int = -1
    size: int = -1
    inflated_size: int = -1  # ≥ 0: a deflated zip member (raw deflate), this many bytes once inflated
    crc32: int = -1  # ≥ 0: a zip member's CRC-32 of the image bytes

    def read(self, root: Path) -> bytes:
        full = root / self.path
        if self.offset < 0:
            return full.read_bytes()
        with open(full, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path} ended inside this member")
        if self.inflated_size >= 0:
            data = self._inflate(data)
        if self.crc32 >= 0 and zlib.crc32(data) != self.crc32:
            raise OSError(f"{self.path}: member {self.key} fails its CRC-32 check")
        return data

    def _inflate(self, data: bytes) -> bytes:
        """At most `inflated_size` + 1 bytes are ever produced, so a hostile member cannot fill the memory."""
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            out = inflater.decompress(data, self.inflated_size + 1)
        except zlib.error as e:
            raise OSError(f"{self.path}: member {self.key} does not inflate ({e})") from None
        if len(out) != self.inflated_size or not inflater.eof:
            raise OSError(f"{self.path}: member {self.key} does not inflate to its recorded "
                          f"{self.inflated_size} bytes")
        return out


@dataclass
class SourceListing:
    root: Path  # member paths are relative to it
    members: list[Member]
    ignored: list[dict]  # {name, reason}: unsafe or non-file members, unlabelled or misplaced files, unread splits
    skipped: list[dict] = field(default_factory=list)  # images lost to a damaged class tar: {key, wnid, path, reason}


@dataclass(frozen=True)
class Layout:
    """Where a split lives in SOURCE: an `archive` (tar) or a `tree` (folder) of ILSVRC-2012, or Tiny ImageNet as
    the extracted folder (`tiny`: `path` is its split folder) or the official zip (`tiny-zip`); the val labels it
    needs (None when class folders or nested class tars name the wnids, or when they are inside the zip), and the
    folder member paths are relative to."""

    kind: str
    path: Path
    root: Path
    labels: Path | None


def find_layout(source: Path, split: str, labels: Path | None = None) -> Layout:
    """Which of the supported layouts SOURCE is, without reading any image; raises a PipeError that says what was
    expected when it is none of them or when val labels are needed and not found. A Tiny ImageNet zip is
    recognised by its first bytes only: its listing (the index unit) reads the central directory and says so if
    it is no Tiny ImageNet."""
    source = source.resolve()
    official_tar = source / (TRAIN_TAR if split == "train" else VAL_TAR)
    if source.is_dir() and official_tar.is_file():
        return _archive_layout(official_tar, split, labels or _find_val_labels(source, split))
    tiny_root = _tiny_root(source, split)
    if tiny_root is not None:
        return _tiny_tree_layout(tiny_root, split, labels)
    if source.is_dir() and (source / TINY_ZIP).is_file():
        return Layout("tiny-zip", source / TINY_ZIP, source, labels)
    if source.is_dir() and (source / split).is_dir():
        return _tree_layout(source / split, split, labels or _find_val_labels(source, split), source)
    if source.is_file() and _is_zip(source):
        return Layout("tiny-zip", source, source.parent, labels)
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
        f"of <wnid>/ class folders{', a flat folder of ILSVRC2012_val_*.JPEG' if split == 'val' else ''}, "
        f"or Tiny ImageNet: a folder holding {TINY_WNIDS} (extracted) or {TINY_ZIP}")


def list_source(source: Path, split: str, labels: Path | None = None) -> SourceListing:
    """Find `split` in SOURCE, whatever its layout, and list its images with their wnids."""
    layout = find_layout(source, split, labels)
    if layout.kind == "archive":
        listing = _list_archive(layout.path, split, layout.labels)
    elif layout.kind == "tiny":
        listing = _list_tiny_tree(layout.root, split, layout.labels)
    elif layout.kind == "tiny-zip":
        listing = _list_tiny_zip(layout.path, split, layout.labels)
    else:
        listing = _list_tree(layout.path, split, layout.labels, layout.root)
    _refuse_duplicate_keys(listing.members)
    return listing


SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+")
ILSVRC_EVAL_NAME = re.compile(r"ILSVRC2012_(val|test)_\d{8}")  # unique by itself, also sorted into class folders
CLASS_SEPARATOR = "~"  # never in an escaped name


def sample_key(file_name: str, class_folder: str | None) -> str:
    """A sample's key in the shards, from its file name and the class folder it lies in (None: a flat folder).

    WebDataset cuts a key at its first dot, DALI's index at spaces, and one class folder's `1.JPEG` is not
    another's. So a name that is safe (`[A-Za-z0-9_-]+` and an image suffix) and unique by itself (it starts with
    its class folder's name and `_`, as every ILSVRC-2012 and Tiny ImageNet training image does; it lies in a flat
    folder; or it is an ILSVRC-2012 val/test name) keeps its stem, so those shards are unchanged. Any other is
    `<class>~<name>` (in a flat folder: `<name>`) with every byte outside `[A-Za-z0-9_-]` of the whole file name
    written `%XX`: `my.photo.JPEG` → `my%2Ephoto%2EJPEG`, `n01440764/1.JPEG` → `n01440764~1%2EJPEG`. Distinct
    names give distinct keys (a kept stem holds no `%` or `~`), and the key depends on nothing but the image's own
    name and folder, so array tasks agree without seeing each other's files."""
    stem, dot, suffix = file_name.rpartition(".")
    if dot and SAFE_NAME.fullmatch(stem) and f".{suffix.lower()}" in IMAGE_SUFFIXES and (
            class_folder is None or stem.startswith(f"{class_folder}_") or ILSVRC_EVAL_NAME.fullmatch(stem)):
        return stem
    escaped = _escape(file_name)
    return escaped if class_folder is None else f"{_escape(class_folder)}{CLASS_SEPARATOR}{escaped}"


def _escape(name: str) -> str:
    return "".join(ch if SAFE_NAME.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode()) for ch in name)


def _refuse_duplicate_keys(members: list[Member]) -> None:
    """Two images of one folder that differ only in their suffix (`a.JPEG`, `a.png`) would be one sample."""
    seen: dict[str, Member] = {}
    for m in members:
        if m.key in seen:
            first = seen[m.key]
            raise PipeError(f"{first.path} and {m.path}: expected one image per name, found two that differ only in "
                            "their suffix (the sample key); rename or remove one")
        seen[m.key] = m


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
                    members.append(Member(sample_key(f.name, d.name), d.name, str(f.relative_to(root))))
        return SourceListing(root, members, ignored)
    truth = _val_ground_truth(labels, folder)
    assert labels is not None  # _val_ground_truth refuses None
    for f in entries:
        if not looks_like_image(f):
            continue
        if f.stem in truth:
            members.append(Member(sample_key(f.name, None), truth[f.stem], str(f.relative_to(root))))
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
                    wnid = truth.get(name.stem) if split == "val" else name.parent.name
                    if wnid is None or (split == "train" and not _is_wnid(wnid)):
                        listing.ignored.append({"name": m.name, "reason": "no label"})
                        continue
                    key = sample_key(name.name, name.parent.name if split == "train" else None)
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
                    listing.members.append(Member(sample_key(PurePosixPath(im.name).name, wnid), wnid, archive.name,
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
# Tiny ImageNet-200: train/<wnid>/images/*.JPEG beside <wnid>_boxes.txt, val/images/*.JPEG + val/val_annotations.txt,
# an unlabelled test/; as the extracted folder or the official zip, never extracted

TINY_TEST_IGNORED = {"name": "test/", "reason": "Tiny ImageNet's test split: unlabelled, so neither split reads it"}
TINY_LAYOUT = (f"expected Tiny ImageNet's train/<wnid>/images/*.JPEG and val/images/*.JPEG with "
               f"val/{TINY_VAL_ANNOTATIONS}")


def _tiny_root(source: Path, split: str) -> Path | None:
    """The extracted tiny-imagenet-200/ (it holds wnids.txt), also when SOURCE is its split folder."""
    if source.is_dir() and (source / TINY_WNIDS).is_file():
        return source
    if source.is_dir() and source.name == split and (source.parent / TINY_WNIDS).is_file():
        return source.parent
    return None


def _tiny_tree_layout(root: Path, split: str, labels: Path | None) -> Layout:
    folder = root / split
    if not folder.is_dir():
        raise PipeError(f"{root}: Tiny ImageNet ({TINY_WNIDS}) without {split}/; {TINY_LAYOUT}")
    if split == "val":
        labels = labels or folder / TINY_VAL_ANNOTATIONS
        if not labels.is_file():
            raise PipeError(f"{folder}: no {TINY_VAL_ANNOTATIONS} (Tiny ImageNet's val labels); pass --labels with "
                            "one, lines 'val_<i>.JPEG<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1'")
    return Layout("tiny", folder, root, labels)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(ZIP_MAGIC)) == ZIP_MAGIC


def _tiny_place(parts: tuple[str, ...], is_dir: bool) -> str:
    """Where a path inside a split folder of Tiny ImageNet (`parts` from its root, `train`/`val` first) stands in
    the layout: "folder" (look inside), "image", "annotation" (bounding boxes and val labels: not images, and not
    noise either) or, for anything else, why it is ignored. The folder and the zip both ask this, so they list
    the same images and ignore the same things."""
    split, depth, name = parts[0], len(parts), parts[-1]
    if depth == 1:
        return "folder"
    if (split, depth) in (("train", 4), ("val", 3)):
        if is_dir:
            return "a folder where only images belong"
        if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
            return f"not an image file name (expected {', '.join(IMAGE_SUFFIXES)})"
        return "image" if split == "val" or parts[2] == "images" else TINY_LAYOUT
    if split == "train" and depth == 2:
        if is_dir and _is_wnid(name):
            return "folder"
        return "not a wnid class folder (expected train/<wnid>/images/)" if is_dir else \
            "a file beside the class folders"
    if split == "train" and depth == 3:
        if is_dir and name == "images":
            return "folder"
        if not is_dir and name == f"{parts[1]}_boxes.txt":
            return "annotation"
        return f"expected only images/ and {parts[1]}_boxes.txt in a Tiny ImageNet class folder"
    if split == "val" and depth == 2:
        if is_dir and name == "images":
            return "folder"
        if not is_dir and name == TINY_VAL_ANNOTATIONS:
            return "annotation"
        return f"expected only images/ and {TINY_VAL_ANNOTATIONS} in Tiny ImageNet's val/"
    return TINY_LAYOUT


def _tiny_wnid(parts: tuple[str, ...], truth: dict[str, str]) -> str | None:
    """train: the class folder names the wnid; val: val_annotations.txt does (None: no line for this image)."""
    return parts[1] if parts[0] == "train" else truth.get(PurePosixPath(parts[-1]).stem)


def _list_tiny_tree(root: Path, split: str, labels: Path | None) -> SourceListing:
    """Walk the split folder as the layout says (so at most three folders deep); symlinks are read through."""
    listing = SourceListing(root, [], [])
    truth: dict[str, str] = {}
    if split == "val":
        assert labels is not None  # _tiny_tree_layout always finds them for val
        truth = _tiny_val_annotations(labels.read_text(), str(labels))

    def visit(folder: Path, parts: tuple[str, ...]) -> None:
        for p in sorted(folder.iterdir()):
            here = (*parts, p.name)
            place = _tiny_place(here, p.is_dir())
            if place == "folder":
                visit(p, here)
            elif place == "image" and not p.is_file():
                listing.ignored.append({"name": "/".join(here), "reason": "not a regular file"})
            elif place == "image":
                _add_tiny_image(listing, here, truth, Member(_tiny_key(here), "", str(p.relative_to(root))))
            elif place != "annotation":
                listing.ignored.append({"name": "/".join(here) + "/" * p.is_dir(), "reason": place})

    visit(root / split, (split,))
    if (root / "test").is_dir():
        listing.ignored.append(TINY_TEST_IGNORED)
    listing.ignored.sort(key=lambda item: item["name"])
    return listing


def _list_tiny_zip(archive: Path, split: str, labels: Path | None) -> SourceListing:
    """Index the official zip from its central directory, then each image's local header (30 bytes and its name)
    for where its data starts: a worker reads only its own members' bytes and inflates them itself."""
    listing = SourceListing(archive.parent, [], [])
    try:
        with zipfile.ZipFile(archive) as z, open(archive, "rb") as f:
            infos = z.infolist()
            top = _tiny_zip_top(infos, archive)
            names = {info.filename for info in infos}
            if not any(name.startswith(f"{top}{split}/") for name in names):
                raise PipeError(f"{archive}: Tiny ImageNet without {top}{split}/; {TINY_LAYOUT}")
            truth = {}
            if split == "val" and labels is not None:
                truth = _tiny_val_annotations(labels.read_text(), str(labels))
            elif split == "val":
                inside = f"{top}val/{TINY_VAL_ANNOTATIONS}"
                if inside not in names:
                    raise PipeError(f"{archive}: no {inside} (Tiny ImageNet's val labels); pass --labels with one")
                truth = _tiny_val_annotations(z.read(inside).decode(), f"{archive}/{inside}")
            reported: set[str] = set()
            for info in infos:
                if not info.filename.startswith(top):
                    continue
                parts = tuple(p for p in info.filename[len(top):].split("/") if p)
                if parts[:1] == ("test",) and TINY_TEST_IGNORED["name"] not in reported:
                    reported.add(TINY_TEST_IGNORED["name"])
                    listing.ignored.append(TINY_TEST_IGNORED)
                if parts[:1] != (split,):
                    continue
                name, place = _tiny_zip_place(info, parts)
                if place == "image":
                    _add_tiny_zip_image(f, info, parts, archive, truth, listing)
                elif place not in ("folder", "annotation") and name not in reported:
                    reported.add(name)
                    listing.ignored.append({"name": name, "reason": place})
    except zipfile.BadZipFile as e:
        raise PipeError(f"{archive}: not a readable zip archive ({e}); a download cut short?") from None
    listing.ignored.sort(key=lambda item: item["name"])
    return listing


def _tiny_zip_place(info: zipfile.ZipInfo, parts: tuple[str, ...]) -> tuple[str, str]:
    """(name, place) of one zip entry, as `_tiny_place` says; a misplaced folder on its way is named instead, once
    for all its entries, as the folder walk names it. An image the zip cannot give as bytes is ignored."""
    for depth in range(1, len(parts)):
        place = _tiny_place(parts[:depth], True)
        if place != "folder":
            return "/".join(parts[:depth]) + "/", place
    name = "/".join(parts) + "/" * info.is_dir()
    place = _tiny_place(parts, info.is_dir())
    if place != "image":
        return name, place
    if stat.S_ISLNK(info.external_attr >> 16):
        return name, "symbolic link (not followed)"
    if info.flag_bits & 0x1:
        return name, "encrypted zip member"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return name, f"zip compression method {info.compress_type} (only stored and deflated members are read)"
    return name, place


def _zip_data_offset(f: IO[bytes], info: zipfile.ZipInfo) -> int | None:
    """Where a member's data starts: after its local header, whose name and extra field may differ in length
    from the central directory's (None: no local header there)."""
    f.seek(info.header_offset)
    header = f.read(ZIP_LOCAL_HEADER.size)
    if len(header) < ZIP_LOCAL_HEADER.size or header[:4] != ZIP_MAGIC:
        return None
    *_, name_length, extra_length = ZIP_LOCAL_HEADER.unpack(header)
    return info.header_offset + ZIP_LOCAL_HEADER.size + name_length + extra_length


def _add_tiny_zip_image(f: IO[bytes], info: zipfile.ZipInfo, parts: tuple[str, ...], archive: Path,
                        truth: dict[str, str], listing: SourceListing) -> None:
    key = _tiny_key(parts)
    offset = _zip_data_offset(f, info)
    if offset is None:
        listing.skipped.append({"key": key, "wnid": _tiny_wnid(parts, truth), "path": f"{archive.name}/{info.filename}",
                                "reason": f"no zip local header at byte {info.header_offset}"})
        return
    deflated = info.compress_type == zipfile.ZIP_DEFLATED
    _add_tiny_image(listing, parts, truth, Member(key, "", archive.name, offset, info.compress_size,
                                                  info.file_size if deflated else -1, info.CRC))


def _tiny_key(parts: tuple[str, ...]) -> str:
    """train/<wnid>/images/<name>: that class; val/images/<name>: a flat folder."""
    return sample_key(parts[-1], parts[1] if parts[0] == "train" else None)


def _add_tiny_image(listing: SourceListing, parts: tuple[str, ...], truth: dict[str, str], member: Member) -> None:
    wnid = _tiny_wnid(parts, truth)
    if wnid is None:
        listing.ignored.append({"name": "/".join(parts), "reason": f"no label in {TINY_VAL_ANNOTATIONS}"})
    else:
        listing.members.append(replace(member, wnid=wnid))


def _tiny_zip_top(infos: list[zipfile.ZipInfo], archive: Path) -> str:
    """The folder of the zip that holds wnids.txt: "tiny-imagenet-200/" in the official zip ("" if at the top)."""
    tops = sorted(info.filename[: -len(TINY_WNIDS)] for info in infos
                  if info.filename.rsplit("/", 1)[-1] == TINY_WNIDS and info.filename.count("/") <= 1)
    if not tops:
        raise PipeError(f"{archive}: a zip without {TINY_WNIDS} at its top or in its top folder; expected Tiny "
                        f"ImageNet's {TINY_ZIP} (tiny-imagenet-200/{TINY_WNIDS}, train/, val/)")
    return min(tops, key=len)


def _tiny_val_annotations(text: str, source: str) -> dict[str, str]:
    """`val_annotations.txt`: `val_<i>.JPEG<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1` → {file stem: wnid}."""
    truth = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or not _is_wnid(fields[1]):
            raise PipeError(f"{source}:{lineno}: expected 'val_<i>.JPEG<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1', "
                            f"found {line!r}")
        truth[PurePosixPath(fields[0]).stem] = fields[1]
    return truth


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
    """The ground truth and meta.mat from the devkit .tar.gz; a cut or damaged archive is one line (gzip's
    EOFError would otherwise reach click, which takes it for Ctrl-D and prints only "Aborted.")."""
    ids = meta = None
    try:
        with tarfile.open(devkit, "r:gz") as t:
            for m in t:
                f = t.extractfile(m) if m.isfile() else None
                if f is not None and m.name.endswith("/" + DEVKIT_GROUND_TRUTH):
                    ids = f.read().decode()
                elif f is not None and m.name.endswith("/meta.mat"):
                    meta = f.read()
    except (EOFError, OSError, tarfile.TarError, zlib.error) as e:
        raise PipeError(f"{devkit}: expected a complete devkit .tar.gz, found a damaged or cut archive "
                        f"({type(e).__name__}: {e or 'ends early'})") from None
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
