"""Writing the demo set as ImageNet ships it: the extracted tree with LOC_val_solution.csv, or the three official
archives (a nested train tar, a flat val tar, the devkit tar.gz with meta.mat and the devkit-ID ground truth), with
fixed header fields so that the same arguments give the same bytes."""

from __future__ import annotations

import csv
import gzip
import io
import tarfile
from itertools import groupby
from pathlib import Path

import numpy as np

from pipeline.sources import (
    DEVKIT_GROUND_TRUTH,
    TRAIN_TAR,
    devkit_id_to_wnid,
    ilsvrc2012_classes,
)
from pipeline.synth.drawing import class_family, render_file
from pipeline.synth.plan import ImageSpec, Plan, file_name

TAR_MTIME = 1339632000  # 2012-06-14, the ILSVRC-2012 release; any constant keeps archives byte-identical


DEVKIT_DIR = "ILSVRC2012_devkit_t12"


MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created by: alexnet-pipe synth (no date)"


def write_tree(out: Path, plan: Plan, wnids, done) -> dict[int, tuple[int, int, int, int]]:
    for wnid in wnids:
        (out / "train" / wnid).mkdir(parents=True)
    for spec, (data, _box) in zip(plan.train, map(render_file, plan.train), strict=True):
        (out / "train" / wnids[spec.label] / file_name(spec, wnids)).write_bytes(data)
        done(1)
    (out / "val").mkdir()
    boxes = {}
    for spec, (data, box) in zip(plan.val, map(render_file, plan.val), strict=True):
        (out / "val" / file_name(spec, wnids)).write_bytes(data)
        boxes[spec.number] = box
        done(1)
    return boxes


def write_val_csv(path: Path, val: list[ImageSpec], wnids, boxes: dict) -> None:
    """Kaggle's LOC_val_solution.csv: `ILSVRC2012_val_00000001,n01751748 111 108 441 375 ` (inclusive box)."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f, lineterminator="\n")
        rows.writerow(["ImageId", "PredictionString"])
        for spec in val:
            rows.writerow([f"ILSVRC2012_val_{spec.number:08d}",
                           " ".join([wnids[spec.label], *map(str, boxes[spec.number])]) + " "])


def _tar_info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = size, TAR_MTIME, 0, 0, "", ""
    info.type, info.mode = (tarfile.DIRTYPE, 0o755) if directory else (tarfile.REGTYPE, 0o644)
    return info


def write_train_tar(out: Path, train: list[ImageSpec], wnids, done) -> None:
    """A tar of per-class tars, as ImageNet ships it. Each inner tar is built in a temporary file beside the
    archive (memory stays flat) and stored uncompressed: an inner member is a byte range of the outer file."""
    inner_path = out / ".class.tar.partial"
    with tarfile.open(out / TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        images = zip(train, map(render_file, train), strict=True)
        for label, group in groupby(images, key=lambda item: item[0].label):
            with tarfile.open(inner_path, "w", format=tarfile.GNU_FORMAT) as inner:
                for spec, (data, _box) in group:
                    inner.addfile(_tar_info(file_name(spec, wnids), len(data)), io.BytesIO(data))
                    done(1)
            with open(inner_path, "rb") as f:
                outer.addfile(_tar_info(f"{wnids[label]}.tar", inner_path.stat().st_size), f)
    inner_path.unlink()


def write_val_tar(path: Path, val: list[ImageSpec], done) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for spec, (data, _box) in zip(val, map(render_file, val), strict=True):
            tar.addfile(_tar_info(f"ILSVRC2012_val_{spec.number:08d}.JPEG", len(data)), io.BytesIO(data))
            done(1)


def write_devkit(path: Path, val: list[ImageSpec], wnids, train_per_class: int) -> None:
    """ILSVRC2012_devkit_t12.tar.gz: data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt, whose
    line i is the devkit ID (meta.mat order, not the sorted label) of ILSVRC2012_val_<i>."""
    wnid_to_devkit_id = {w: i for i, w in devkit_id_to_wnid().items()}
    truth = "".join(f"{wnid_to_devkit_id[wnids[spec.label]]}\n" for spec in val).encode()
    files = [(f"{DEVKIT_DIR}/data/meta.mat", meta_mat(set(wnids), train_per_class)),
             (f"{DEVKIT_DIR}/data/{DEVKIT_GROUND_TRUTH}", truth)]
    with open(path, "wb") as raw, gzip.GzipFile(path.name[:-3], "wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for folder in (DEVKIT_DIR, f"{DEVKIT_DIR}/data"):
            tar.addfile(_tar_info(folder + "/", directory=True))
        for name, data in files:
            tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def meta_mat(present: set[str], train_per_class: int) -> bytes:
    """The devkit's data/meta.mat: a (1000, 1) struct array `synsets` of the leaf classes in devkit-ID order,
    with the real file's fields and types (so `loadmat(squeeze_me=True)["synsets"]["ILSVRC2012_ID"]` reads
    ints and `["WNID"]` strings). The gloss names the class's generated family; num_train_images counts this
    data set."""
    from scipy.io import savemat

    table = ilsvrc2012_classes()
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")
    synsets = np.empty((1000, 1), dtype=[(f, object) for f in fields])
    for row, (devkit_id, wnid) in enumerate(sorted(devkit_id_to_wnid().items())):
        label = table.label_of(wnid)
        synsets[row, 0] = (np.array([[devkit_id]], np.uint16), np.array([wnid]),
                           np.array([table.names[label]]),
                           np.array([f"generated image family: {class_family(label).describe()}"]),
                           np.array([[0]], np.uint8), np.zeros((1, 0), np.uint8), np.array([[0]], np.uint8),
                           np.array([[train_per_class if wnid in present else 0]], np.uint16))
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    data = bytearray(buf.getvalue())
    data[:116] = MAT_HEADER.ljust(116)  # scipy writes the creation time here
    return bytes(data)
