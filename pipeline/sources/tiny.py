"""Tiny ImageNet-200 as downloaded: train/<wnid>/images/*.JPEG beside <wnid>_boxes.txt, val/images/*.JPEG with
val/val_annotations.txt, an unlabelled test/; the extracted folder or the official zip (read in place: each image a
byte range of the zip, inflated in the worker that reads it)."""

from __future__ import annotations

import stat
import struct
import zipfile
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import IO

from pipeline.errors import PipeError
from pipeline.records import IgnoredEntry, SkippedImage
from pipeline.sources.listing import IMAGE_SUFFIXES, Layout, Member, SourceListing, is_wnid, sample_key

# Tiny ImageNet-200 (CS231n): 64x64 photos of 200 ILSVRC-2012 classes, as the extracted tiny-imagenet-200/ or its zip
TINY_WNIDS = "wnids.txt"


TINY_ZIP = "tiny-imagenet-200.zip"


TINY_VAL_ANNOTATIONS = "val_annotations.txt"


ZIP_MAGIC = b"PK\x03\x04"


ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature … name length, extra length: 30 bytes before the name


TINY_TEST_IGNORED = IgnoredEntry("test/", "Tiny ImageNet's test split: unlabelled, so neither split reads it")


TINY_LAYOUT = (f"expected Tiny ImageNet's train/<wnid>/images/*.JPEG and val/images/*.JPEG with "
               f"val/{TINY_VAL_ANNOTATIONS}")


def tiny_root(source: Path, split: str) -> Path | None:
    """The extracted tiny-imagenet-200/ (it holds wnids.txt), also when SOURCE is its split folder."""
    if source.is_dir() and (source / TINY_WNIDS).is_file():
        return source
    if source.is_dir() and source.name == split and (source.parent / TINY_WNIDS).is_file():
        return source.parent
    return None


def tiny_tree_layout(root: Path, split: str, labels: Path | None) -> Layout:
    folder = root / split
    if not folder.is_dir():
        raise PipeError(f"{root}: Tiny ImageNet ({TINY_WNIDS}) without {split}/; {TINY_LAYOUT}")
    if split == "val":
        labels = labels or folder / TINY_VAL_ANNOTATIONS
        if not labels.is_file():
            raise PipeError(f"{folder}: no {TINY_VAL_ANNOTATIONS} (Tiny ImageNet's val labels); pass --labels with "
                            "one, lines 'val_<i>.JPEG<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1'")
    return Layout("tiny", folder, root, labels)


def is_zip(path: Path) -> bool:
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
        if is_dir and is_wnid(name):
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


def _wnids(path: Path, text: str) -> tuple[str, ...]:
    """wnids.txt: one wnid a line (in no particular order)."""
    wnids = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not wnids or not all(is_wnid(w) for w in wnids):
        raise PipeError(f"{path}: expected one wnid (nXXXXXXXX) a line, found {text[:40]!r}")
    return wnids


def _tiny_wnid(parts: tuple[str, ...], truth: dict[str, str]) -> str | None:
    """train: the class folder names the wnid; val: val_annotations.txt does (None: no line for this image)."""
    return parts[1] if parts[0] == "train" else truth.get(PurePosixPath(parts[-1]).stem)


def list_tiny_tree(root: Path, split: str, labels: Path | None) -> SourceListing:
    """Walk the split folder as the layout says (so at most three folders deep); symlinks are read through."""
    listing = SourceListing(root, [], [])
    truth: dict[str, str] = {}
    if split == "val":
        assert labels is not None  # tiny_tree_layout always finds them for val
        truth = _tiny_val_annotations(labels.read_text(), str(labels))

    def visit(folder: Path, parts: tuple[str, ...]) -> None:
        for p in sorted(folder.iterdir()):
            here = (*parts, p.name)
            place = _tiny_place(here, p.is_dir())
            if place == "folder":
                visit(p, here)
            elif place == "image" and not p.is_file():
                listing.ignored.append(IgnoredEntry("/".join(here), "not a regular file"))
            elif place == "image":
                _add_tiny_image(listing, here, truth, Member(_tiny_key(here), "", str(p.relative_to(root))))
            elif place != "annotation":
                listing.ignored.append(IgnoredEntry("/".join(here) + "/" * p.is_dir(), place))

    visit(root / split, (split,))
    listing.class_list = _wnids(root / TINY_WNIDS, (root / TINY_WNIDS).read_text())
    if (root / "test").is_dir():
        listing.ignored.append(TINY_TEST_IGNORED)
    listing.ignored.sort(key=lambda item: item.name)
    return listing


def list_tiny_zip(archive: Path, split: str, labels: Path | None) -> SourceListing:
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
            listing.class_list = _wnids(archive / f"{top}{TINY_WNIDS}", z.read(f"{top}{TINY_WNIDS}").decode())
            reported: set[str] = set()
            for info in infos:
                if not info.filename.startswith(top):
                    continue
                parts = tuple(p for p in info.filename[len(top):].split("/") if p)
                if parts[:1] == ("test",) and TINY_TEST_IGNORED.name not in reported:
                    reported.add(TINY_TEST_IGNORED.name)
                    listing.ignored.append(TINY_TEST_IGNORED)
                if parts[:1] != (split,):
                    continue
                name, place = _tiny_zip_place(info, parts)
                if place == "image":
                    _add_tiny_zip_image(f, info, parts, archive, truth, listing)
                elif place not in ("folder", "annotation") and name not in reported:
                    reported.add(name)
                    listing.ignored.append(IgnoredEntry(name, place))
    except zipfile.BadZipFile as e:
        raise PipeError(f"{archive}: not a readable zip archive ({e}); a download cut short?") from None
    listing.ignored.sort(key=lambda item: item.name)
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
        listing.skipped.append(SkippedImage(key, _tiny_wnid(parts, truth), f"{archive.name}/{info.filename}",
                                            f"no zip local header at byte {info.header_offset}"))
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
        listing.ignored.append(IgnoredEntry("/".join(parts), f"no label in {TINY_VAL_ANNOTATIONS}"))
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
        if len(fields) < 2 or not is_wnid(fields[1]):
            raise PipeError(f"{source}:{lineno}: expected 'val_<i>.JPEG<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1', "
                            f"found {line!r}")
        truth[PurePosixPath(fields[0]).stem] = fields[1]
    return truth
