"""What every source lists: its images as `Member`s (a key, a wnid, where the bytes are), what it ignored, and the
`Layout` it was found in; and the one rule that turns a file name into a sample key."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipeError
from pipeline.records import IgnoredEntry, SkippedImage

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


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
    ignored: list[IgnoredEntry]  # unsafe or non-file members, unlabelled or misplaced files, unread splits
    skipped: list[SkippedImage] = field(default_factory=list)  # images lost to a damaged class tar
    # the classes the source names for both splits (Tiny ImageNet's wnids.txt, an extracted tree's train/ class
    # folders); None: the classes of the split's own images (the official archives hold all 1,000 in each)
    class_list: tuple[str, ...] | None = None

    def classes(self) -> list[str]:
        """The source's classes in sorted-wnid order: `--max-classes N` takes the first N, in both splits alike."""
        return sorted(self.class_list if self.class_list is not None else {m.wnid for m in self.members})


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


def refuse_duplicate_keys(members: list[Member]) -> None:
    """Two images of one folder that differ only in their suffix (`a.JPEG`, `a.png`) would be one sample."""
    seen: dict[str, Member] = {}
    for m in members:
        if m.key in seen:
            first = seen[m.key]
            raise PipeError(f"{first.path} and {m.path}: expected one image per name, found two that differ only in "
                            "their suffix (the sample key); rename or remove one")
        seen[m.key] = m


def is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
