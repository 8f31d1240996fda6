"""CIFAR-10 for Figure 1: the official python batches (`cifar-10-python.tar.gz`, read without extracting, or its
extracted `cifar-10-batches-py/`) and image folders `train/<class>/*`, recognised from what the path holds.

Only the training split is read: Figure 1 plots training error. Images are uint8 (N, 3, 32, 32) in a canonical
order, class by class and within a class in the source's own order (batch order, or file names), so the same pixels
in either layout give the same arrays and the same seeded subset. CIFAR's classes are not wnids: nothing here
touches the shard/label machinery.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.errors import PipeError

# The official label order (batches.meta's label_names), which is also the sorted order of the folder names.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCHIVE = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
SIDE = 32
EXPECTED = (f"expected CIFAR-10: {ARCHIVE}, its extracted {BATCHES_DIR}/ (data_batch_1…5), or image folders "
            f"train/<class>/ with the ten classes ({', '.join(CLASSES)})")


@dataclass(frozen=True)
class CifarSource:
    """Where the training split is and in which layout: `archive`, `batches` or `folders`."""

    layout: str
    path: Path

    def describe(self) -> str:
        return {"archive": "the official python archive", "batches": "the official python batches",
                "folders": "image folders"}[self.layout] + f" at {self.path}"


def find_source(path: Path) -> CifarSource:
    """Recognise the layout from names alone (no image is read), so a wrong path is one line at once."""
    if not path.exists():
        raise PipeError(f"{path}: not found; {EXPECTED}")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise PipeError(f"{path}: {EXPECTED}; found a file that is not a tar archive")
        return CifarSource("archive", path)
    if all((path / b).is_file() for b in TRAIN_BATCHES):
        return CifarSource("batches", path)
    for inner in (path / BATCHES_DIR, path / ARCHIVE):  # torchvision's root folder holds both
        if inner.exists():
            return find_source(inner)
    for split in (path / "train", path):
        if split.is_dir() and {p.name for p in split.iterdir() if p.is_dir()} >= set(CLASSES):
            return CifarSource("folders", split)
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(found[:8]) + (f", … ({len(found)} entries)" if len(found) > 8 else "")
    raise PipeError(f"{path}: {EXPECTED}; found {shown or 'an empty folder'}")


def download(root: Path) -> Path:
    """Fetch the official archive into `root` through torchvision (checksum verified); kept as downloaded."""
    from urllib.error import URLError

    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, download_url

    target = root / ARCHIVE
    if check_integrity(str(target), CIFAR10.tgz_md5):
        return target
    try:
        download_url(CIFAR10.url, str(root), ARCHIVE, CIFAR10.tgz_md5)
    except (URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise PipeError(f"could not fetch {CIFAR10.url} ({reason}); without a network, put {ARCHIVE} in {root} by "
                        "hand", option="download") from None
    return target


@dataclass(frozen=True)
class TrainingSplit:
    """The training labels in canonical order, and a reader of any subset of the images."""

    source: CifarSource
    labels: np.ndarray  # int64 (N,)
    _images: np.ndarray | None  # uint8 (N, 3, 32, 32), for the python batches (read whole anyway)
    _files: tuple[Path, ...] | None  # for image folders: decoded only when asked for

    def images(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, 32, 32) of the images at `indices` (folders decode just those files)."""
        if self._images is not None:
            return self._images[indices]
        assert self._files is not None  # one of the two is set
        out = np.empty((len(indices), 3, SIDE, SIDE), np.uint8)
        for k, i in enumerate(indices):
            out[k] = _decode(self._files[i])
        return out


def read_training_split(source: CifarSource) -> TrainingSplit:
    if source.layout == "folders":
        files, labels = [], []
        for label, name in enumerate(CLASSES):
            names = sorted(p for p in (source.path / name).iterdir() if p.is_file() and not p.name.startswith("."))
            files += names
            labels += [label] * len(names)
        if not files:
            raise PipeError(f"{source.path}: {EXPECTED}; found class folders without images")
        return TrainingSplit(source, np.array(labels, np.int64), None, tuple(files))
    parts = [_batch(name, blob) for name, blob in _batch_files(source)]
    images = np.concatenate([p[0] for p in parts])
    batch_labels = np.concatenate([p[1] for p in parts])
    order = np.argsort(batch_labels, kind="stable")
    return TrainingSplit(source, batch_labels[order], images[order], None)


def balanced_subset(labels: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded class-balanced subset of `n` images (the first n % 10 classes get one more);
    all of them for None."""
    if n is None:
        return np.arange(len(labels))
    counts = np.bincount(labels, minlength=len(CLASSES))
    want = [n // len(CLASSES) + (c < n % len(CLASSES)) for c in range(len(CLASSES))]
    if n < 1 or any(w > have for w, have in zip(want, counts)):
        raise PipeError(f"expected 1..{len(labels)} with at most {counts.min()} a class, got {n}",
                        option="train_images")
    rng = np.random.default_rng(seed)
    picked = [np.flatnonzero(labels == c)[rng.permutation(counts[c])[:w]] for c, w in enumerate(want)]
    return np.sort(np.concatenate(picked))


def channel_mean(images: np.ndarray) -> list[float]:
    """The per-channel mean pixel (0-255) of the images trained on: what §2's mean subtraction takes away."""
    return [float(images[:, c].mean(dtype=np.float64)) for c in range(3)]


# ---------------------------------------------------------------------------------------------------------------
# the official python batches


def _batch_files(source: CifarSource) -> list[tuple[str, bytes]]:
    if source.layout == "batches":
        return [(str(source.path / b), (source.path / b).read_bytes()) for b in TRAIN_BATCHES]
    try:
        with tarfile.open(source.path) as tar:
            members = {PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [b for b in TRAIN_BATCHES if b not in members]
            if missing:
                raise PipeError(f"{source.path}: {EXPECTED}; the archive has no {', '.join(missing)}")
            blobs = []
            for b in TRAIN_BATCHES:
                f = tar.extractfile(members[b])
                assert f is not None  # members holds regular files only
                blobs.append((f"{source.path}:{members[b].name}", f.read()))
            return blobs
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PipeError(f"{source.path}: a damaged archive ({e}); download it again") from None


class _BatchUnpickler(pickle.Unpickler):
    """The batches are pickles: allow only what a dict of numpy arrays and lists needs, never arbitrary code
    (`_codecs.encode` is how Python 3 writes bytes at pickle protocol 2, as re-pickled batches have them)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"a CIFAR batch holds no {module}.{name}")
        return super().find_class(module, name)


def _batch(where: str, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One python batch: b'data' (n, 3072) uint8, rows R then G then B planes; b'labels' a list of ints."""
    try:
        raw = _BatchUnpickler(io.BytesIO(blob), encoding="latin1").load()  # py2 pickles: latin1, as numpy advises
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
        data = np.asarray(batch["data"], np.uint8).reshape(-1, 3, SIDE, SIDE)
        labels = np.asarray(batch["labels"], np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, AttributeError, TypeError) as e:
        raise PipeError(f"{where}: expected a CIFAR-10 python batch (a pickled dict with data and labels), "
                        f"could not read it ({e})") from None
    if len(data) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(CLASSES):
        raise PipeError(f"{where}: expected {len(data)} labels in 0..9, found {len(labels)}")
    return data, labels


def _decode(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise PipeError(f"{path}: not a readable image ({e})") from None
    if rgb.shape != (SIDE, SIDE, 3):
        raise PipeError(f"{path}: expected a {SIDE}×{SIDE} CIFAR-10 image, found {rgb.shape[1]}×{rgb.shape[0]}")
    return rgb.transpose(2, 0, 1)
