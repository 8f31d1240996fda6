"""ILSVRC-2012 as downloaded or extracted: the official tars (a train tar of 1,000 class tars, a flat val tar; every
image a byte range of the outer file, never extracted to disk) or a tree (`train/<wnid>/`, val flat or in class
folders)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO

from pipeline.errors import PipeError
from pipeline.records import IgnoredEntry, SkippedImage
from pipeline.sources.labels import no_val_labels, val_ground_truth
from pipeline.sources.listing import (
    COMPRESSED_MAGIC,
    IMAGE_SUFFIXES,
    Layout,
    Member,
    SourceListing,
    is_wnid,
    sample_key,
)

TRAIN_TAR = "ILSVRC2012_img_train.tar"


VAL_TAR = "ILSVRC2012_img_val.tar"


def archive_layout(archive: Path, split: str, labels: Path | None) -> Layout:
    with open(archive, "rb") as f:
        magic = f.read(6)
    compression = next((name for sig, name in COMPRESSED_MAGIC.items() if magic.startswith(sig)), None)
    if compression:
        raise PipeError(f"{archive}: a {compression}-compressed archive; images are read as byte ranges of an "
                        f"uncompressed tar, so decompress it first (the official ImageNet tars are uncompressed)")
    if split == "val" and labels is None:
        raise PipeError(no_val_labels(archive))
    return Layout("archive", archive, archive.parent, labels)


def tree_layout(folder: Path, split: str, labels: Path | None, root: Path) -> Layout:
    if any(p.is_dir() and is_wnid(p.name) for p in folder.iterdir()):  # train/<wnid>/… or val in valprep.sh layout
        return Layout("tree", folder, root, None)
    if split == "train":
        raise PipeError(f"{folder}: expected train/<wnid>/*.JPEG class folders, found none")
    if labels is None:
        raise PipeError(no_val_labels(folder))
    return Layout("tree", folder, root, labels)


def list_tree(folder: Path, split: str, labels: Path | None, root: Path) -> SourceListing:
    """A symlinked file is read through its link (reading cannot write outside OUT); a name that looks like an image
    but is no regular file (a dangling link, a fifo), a folder that is not a wnid and a file where no image belongs
    are listed as ignored, never dropped without a word."""
    members, ignored = [], []

    def ignore(p: Path, reason: str) -> None:
        ignored.append(IgnoredEntry(str(p.relative_to(root)) + ("/" if p.is_dir() else ""), reason))

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
    class_dirs = [p for p in entries if p.is_dir() and is_wnid(p.name)]
    if class_dirs:
        for p in entries:
            if p not in class_dirs and p != labels:
                ignore(p, "not a wnid class folder (expected nXXXXXXXX/)" if p.is_dir() else
                       "a file beside the class folders")
        for d in class_dirs:
            for f in sorted(d.iterdir()):
                if looks_like_image(f):
                    members.append(Member(sample_key(f.name, d.name), d.name, str(f.relative_to(root))))
        return SourceListing(root, members, ignored, class_list=_train_classes(root))
    truth = val_ground_truth(labels, folder)
    assert labels is not None  # val_ground_truth refuses None
    for f in entries:
        if not looks_like_image(f):
            continue
        if f.stem in truth:
            members.append(Member(sample_key(f.name, None), truth[f.stem], str(f.relative_to(root))))
        else:
            ignored.append(IgnoredEntry(f.name, "no label in " + labels.name))
    return SourceListing(root, members, ignored, class_list=_train_classes(root))


def _train_classes(root: Path) -> tuple[str, ...] | None:
    """An extracted tree's classes: its train/ class folders, the same list for both splits (None: no train/)."""
    train = root / "train"
    return tuple(sorted(p.name for p in train.iterdir() if p.is_dir() and is_wnid(p.name))) if train.is_dir() else None


def list_archive(archive: Path, split: str, labels: Path | None) -> SourceListing:
    """Index an official archive by reading tar headers only (tarfile seeks over member data). Directory members
    are passed over; links, devices, names that would leave a folder and members that are no image are listed as
    ignored. A damaged class tar loses only what follows the damage (listed as skipped); the split goes on."""
    listing = SourceListing(archive.parent, [], [])
    truth = val_ground_truth(labels, archive) if split == "val" else {}
    try:
        with open(archive, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
            for m in outer:
                if m.isdir():
                    continue
                reason = _unsafe(m)
                if reason:
                    listing.ignored.append(IgnoredEntry(m.name, reason))
                    continue
                name = PurePosixPath(m.name)
                if name.suffix == ".tar":  # the train tar: one uncompressed tar per class
                    _list_class_tar(f, m, archive, listing)
                    f.seek(m.offset_data + m.size)  # the inner listing moved the shared file position
                elif name.suffix.lower() in IMAGE_SUFFIXES:
                    wnid = truth.get(name.stem) if split == "val" else name.parent.name
                    if wnid is None or (split == "train" and not is_wnid(wnid)):
                        listing.ignored.append(IgnoredEntry(m.name, "no label"))
                        continue
                    key = sample_key(name.name, name.parent.name if split == "train" else None)
                    listing.members.append(Member(key, wnid, archive.name, m.offset_data, m.size))
                else:
                    listing.ignored.append(IgnoredEntry(m.name, "neither an image nor a class tar"))
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
                    listing.ignored.append(IgnoredEntry(f"{m.name}/{im.name}", reason))
                elif PurePosixPath(im.name).suffix.lower() in IMAGE_SUFFIXES:
                    listing.members.append(Member(sample_key(PurePosixPath(im.name).name, wnid), wnid, archive.name,
                                                  m.offset_data + im.offset_data, im.size))
                    kept += 1
                elif not im.isdir():
                    listing.ignored.append(IgnoredEntry(f"{m.name}/{im.name}", "not an image file name"))
            end = inner.offset  # where tarfile stopped: the end-of-archive blocks, or a header it could not read
            if _ByteRange(f, m.offset_data + end, min(tarfile.BLOCKSIZE, m.size - end)).read().strip(b"\0"):
                raise tarfile.ReadError(f"unreadable member header at byte {end}")
    except tarfile.TarError as e:
        listing.skipped.append(SkippedImage(None, wnid, f"{archive.name}/{m.name}",
                                            f"damaged class tar {m.name} ({e}): the rest of it is lost, "
                                            f"{kept} complete images before the damage kept"))


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
