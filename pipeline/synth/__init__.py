"""The embedded default data set: a generated ImageNet look-alike with ILSVRC-2012's names and conventions.

Each class is a visual family fixed by its sorted-wnid label: an object shape, a fill texture and a two-colour
palette (`class_family`). Every image draws that object near the centre at a random scale, rotation, stretch
and palette jitter, over a smooth multi-colour background with clutter (shapes and lines in random colours),
with pixel noise, sometimes blur, at an ImageNet-like size and JPEG quality. So the class signal survives a
256-short-side resize and a central 224 crop, yet no two images of a class are alike.

Every image is drawn from its own generator seeded by (seed, split, label, index): any image can be made
alone, in any order and in any process, and the same arguments always give byte-identical files (archives
included: fixed tar header fields, gzip mtime 0, a meta.mat header without a date).

Like ImageNet, each split holds one grayscale JPEG, one CMYK JPEG and one PNG saved under a `.JPEG` name; they
take the place of ordinary images, so the counts stay as requested (a split of fewer than three images holds
as many of them as fit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipeError
from pipeline.sources import DEVKIT_TAR, KAGGLE_VAL_CSV, VAL_TAR, ilsvrc2012_classes
from pipeline.synth.archives import write_devkit, write_train_tar, write_tree, write_val_csv, write_val_tar
from pipeline.synth.drawing import class_family
from pipeline.synth.plan import QUIRKS, SPLITS, file_name, plan_images

FORMATS = ("tree", "tars")


def synth_image_count(classes: int, train_per_class: int, val_per_class: int) -> int:
    """How many images `generate` writes (train and val together)."""
    _check_counts(classes, train_per_class, val_per_class)
    return classes * (train_per_class + val_per_class)


def generate(out: Path, *, classes: int = 10, train_per_class: int = 100, val_per_class: int = 20,
             seed: int = 0, fmt: str = "tree", progress: Callable[[int], None] | None = None) -> SynthSummary:
    """Write the data set into `out` (an existing, empty folder) and return a summary.

    fmt "tree": train/<wnid>/<wnid>_<n>.JPEG, flat val/ILSVRC2012_val_<8 digits>.JPEG, LOC_val_solution.csv
    and LOC_synset_mapping.txt. fmt "tars": the three official archives instead (nested train tar, flat val
    tar, devkit tar.gz with meta.mat and the devkit-ID ground truth). `progress(n)` is called as n images are
    done. An image takes about 4 ms, so one process suffices (about 5 s for the 1,200 default images)."""
    _check_counts(classes, train_per_class, val_per_class)
    if fmt not in FORMATS:
        raise PipeError(f"unknown synth format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:  # one word of every image's generator key
        raise PipeError(f"seed must be an integer in 0..2**32-1, found {seed!r}")
    out = Path(out)
    if not out.is_dir():
        raise PipeError(f"{out}: expected an existing empty folder to generate the data set in")
    if any(out.iterdir()):
        raise PipeError(f"{out}: folder is not empty; synth writes only into an empty folder")

    table = ilsvrc2012_classes()
    wnids = table.wnids[:classes]
    plan = plan_images(seed, classes, train_per_class, val_per_class)
    total = len(plan.train) + len(plan.val)
    done = progress or (lambda n: None)
    if fmt == "tree":
        boxes = write_tree(out, plan, wnids, done)
        write_val_csv(out / KAGGLE_VAL_CSV, plan.val, wnids, boxes)
        (out / "LOC_synset_mapping.txt").write_text(
            "".join(f"{w} {n}\n" for w, n in zip(wnids, table.names[:classes], strict=True)))
    else:
        write_train_tar(out, plan.train, wnids, done)
        write_val_tar(out / VAL_TAR, plan.val, done)
        write_devkit(out / DEVKIT_TAR, plan.val, wnids, train_per_class)
    quirk_files = {split: {kind: file_name(spec, wnids) for kind in QUIRKS for spec in plan.split(split)
                           if spec.kind == kind} for split in SPLITS}
    return SynthSummary(fmt, seed, classes, tuple(wnids), len(plan.train), len(plan.val), total,
                        tuple(name for split in SPLITS for name in quirk_files[split].values()), quirk_files,
                        {w: class_family(i).describe() for i, w in enumerate(wnids)})


@dataclass(frozen=True)
class SynthSummary:
    """What `generate` wrote: its settings, the wnids, the counts, the quirk files (split → kind → file name) and
    each class's visual family in words."""

    format: str
    seed: int
    classes: int
    wnids: tuple[str, ...]
    train_images: int
    val_images: int
    images: int
    quirks: tuple[str, ...]
    quirk_files: dict[str, dict[str, str]]
    families: dict[str, str]


def _check_counts(classes: int, train_per_class: int, val_per_class: int) -> None:
    if not isinstance(classes, int) or not 1 <= classes <= 1000:
        raise PipeError(f"classes must be an integer in 1..1000 (the first N ILSVRC-2012 wnids), "
                        f"found {classes!r}")
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if not isinstance(value, int) or value < 1:
            raise PipeError(f"{name} must be an integer >= 1, found {value!r}")
