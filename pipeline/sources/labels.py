"""ILSVRC-2012's val labels, from any of the files that hold them: Kaggle's `LOC_val_solution.csv`, the devkit tar
or its `ILSVRC2012_validation_ground_truth.txt` (devkit IDs, mapped to wnids through meta.mat's order)."""

from __future__ import annotations

import csv
import io
import tarfile
import zlib
from pathlib import Path

from pipeline.errors import PipeError
from pipeline.sources.classes import devkit_id_to_wnid

KAGGLE_VAL_CSV = "LOC_val_solution.csv"


DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"


DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


def find_val_labels(folder: Path, split: str) -> Path | None:
    if split != "val":
        return None
    for name in (KAGGLE_VAL_CSV, DEVKIT_TAR, DEVKIT_GROUND_TRUTH):
        if (folder / name).is_file():
            return folder / name
    return None


def no_val_labels(where: Path) -> str:
    return (f"{where}: val labels not found; pass --labels with {KAGGLE_VAL_CSV}, {DEVKIT_TAR} or "
            f"{DEVKIT_GROUND_TRUTH}, or put one beside the val images")


def val_ground_truth(labels: Path | None, where: Path) -> dict[str, str]:
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
