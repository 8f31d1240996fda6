"""Where images come from: ILSVRC-2012 (`ilsvrc`: official tars or an extracted tree, val labels from `labels`),
Tiny ImageNet (`tiny`: folder or zip) and CIFAR-10 for Figure 1 (`cifar`), each read as downloaded; the class tables
(`classes`). `find_layout` recognises a source without reading an image; `list_source` lists a split through the
reader its layout names (timm's reader-factory pattern), every reader giving the same `SourceListing`."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import PipeError
from pipeline.sources.classes import (
    ClassTable,
    class_table,
    devkit_id_to_wnid,
    ilsvrc2012_classes,
    load_classes,
    run_classes,
    val_class_problems,
)
from pipeline.sources.ilsvrc import TRAIN_TAR, VAL_TAR, archive_layout, list_archive, list_tree, tree_layout
from pipeline.sources.labels import DEVKIT_GROUND_TRUTH, DEVKIT_TAR, KAGGLE_VAL_CSV, find_val_labels
from pipeline.sources.listing import (
    IMAGE_SUFFIXES,
    Layout,
    Member,
    SourceListing,
    is_image,
    is_wnid,
    refuse_duplicate_keys,
    sample_key,
)
from pipeline.sources.tiny import (
    TINY_TEST_IGNORED,
    TINY_WNIDS,
    TINY_ZIP,
    is_zip,
    list_tiny_tree,
    list_tiny_zip,
    tiny_root,
    tiny_tree_layout,
)

__all__ = ["DEVKIT_GROUND_TRUTH", "DEVKIT_TAR", "IMAGE_SUFFIXES", "KAGGLE_VAL_CSV", "TINY_TEST_IGNORED", "TRAIN_TAR",
           "VAL_TAR", "ClassTable", "Layout", "Member", "SourceListing", "class_table", "devkit_id_to_wnid",
           "find_layout", "ilsvrc2012_classes", "list_source", "load_classes", "run_classes", "sample_key",
           "val_class_problems"]


def find_layout(source: Path, split: str, labels: Path | None = None) -> Layout:
    """Which of the supported layouts SOURCE is, without reading any image; raises a PipeError that says what was
    expected when it is none of them or when val labels are needed and not found. A Tiny ImageNet zip is
    recognised by its first bytes only: its listing (the index unit) reads the central directory and says so if
    it is no Tiny ImageNet."""
    source = source.resolve()
    official_tar = source / (TRAIN_TAR if split == "train" else VAL_TAR)
    if source.is_dir() and official_tar.is_file():
        return archive_layout(official_tar, split, labels or find_val_labels(source, split))
    tiny = tiny_root(source, split)
    if tiny is not None:
        return tiny_tree_layout(tiny, split, labels)
    if source.is_dir() and (source / TINY_ZIP).is_file():
        return Layout("tiny-zip", source / TINY_ZIP, source, labels)
    if source.is_dir() and (source / split).is_dir():
        return tree_layout(source / split, split, labels or find_val_labels(source, split), source)
    if source.is_file() and is_zip(source):
        return Layout("tiny-zip", source, source.parent, labels)
    if source.is_file() and tarfile.is_tarfile(source):
        return archive_layout(source, split, labels or find_val_labels(source.parent, split))
    if source.is_dir() and any(is_wnid(p.name) and p.is_dir() for p in source.iterdir()):
        return Layout("tree", source, source, None)
    if source.is_dir() and split == "val" and any(is_image(p) for p in source.iterdir()):
        return tree_layout(source, split, labels or find_val_labels(source, split)
                            or find_val_labels(source.parent, split), source)
    raise PipeError(
        f"{source}: no ImageNet {split} split found. Expected one of: a folder holding {official_tar.name} "
        f"(official archives), a folder holding {split}/ (extracted tree), a {split} .tar archive, a folder "
        f"of <wnid>/ class folders{', a flat folder of ILSVRC2012_val_*.JPEG' if split == 'val' else ''}, "
        f"or Tiny ImageNet: a folder holding {TINY_WNIDS} (extracted) or {TINY_ZIP}")


# The reader of each layout (`Layout.kind`): every one lists a split as the same `SourceListing`.
READERS: dict[str, Callable[[Layout, str], SourceListing]] = {
    "archive": lambda layout, split: list_archive(layout.path, split, layout.labels),
    "tree": lambda layout, split: list_tree(layout.path, split, layout.labels, layout.root),
    "tiny": lambda layout, split: list_tiny_tree(layout.root, split, layout.labels),
    "tiny-zip": lambda layout, split: list_tiny_zip(layout.path, split, layout.labels),
}


def list_source(source: Path, split: str, labels: Path | None = None) -> SourceListing:
    """Find `split` in SOURCE, whatever its layout, and list its images with their wnids."""
    layout = find_layout(source, split, labels)
    listing = READERS[layout.kind](layout, split)
    refuse_duplicate_keys(listing.members)
    return listing
