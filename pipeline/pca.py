"""RGB PCA of the training set (paper §4.1, "PCA on the set of RGB pixel values throughout the training set").

Per shard we keep a partial of exact integer sums over the uint8 pixels: count, Σx (3) and Σxxᵀ (3×3). Partials
merge by addition, in any order and grouping, bit-identically. The reduce converts to [0,1] units once.
Per image Σxxᵀ is six float64 dot products over contiguous colour planes, exact because each partial sum is an
integer below 2⁵³, then accumulated as Python/int64 integers; all of ImageNet stays below 7e15.
"""

from __future__ import annotations

import io
import math
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipeError
from pipeline.records import Pca, PixelStats, Record


@dataclass
class Moments(Record):
    """Exact integer moments of uint8 RGB pixels (a pca-stats unit record: one per shard)."""

    images: int = 0
    pixels: int = 0
    sum: tuple[int, ...] = (0, 0, 0)
    sumsq: tuple[tuple[int, ...], ...] = ((0, 0, 0),) * 3

    def __add__(self, other: Moments) -> Moments:
        return Moments(
            self.images + other.images,
            self.pixels + other.pixels,
            tuple(a + b for a, b in zip(self.sum, other.sum, strict=True)),
            tuple(tuple(a + b for a, b in zip(ra, rb, strict=True)) for ra, rb in zip(self.sumsq, other.sumsq,
                                                                                       strict=True)),
        )



def plane_moments(planes: np.ndarray) -> Moments:
    """Moments of one image given as 3 contiguous uint8 colour planes (3×N)."""
    p = planes.astype(np.float64)
    # six contiguous dot products: exact (all partial sums are integers < 2^53, in any summation order) and ~9x
    # faster than a 3×N GEMM here
    dots = {(i, j): int(np.dot(p[i], p[j])) for i in range(3) for j in range(i, 3)}
    sumsq = tuple(tuple(dots[min(i, j), max(i, j)] for j in range(3)) for i in range(3))
    return Moments(1, p.shape[1], tuple(int(v) for v in p.sum(axis=1)), sumsq)


def pixel_moments(pixels: np.ndarray) -> Moments:
    """Moments of one image as H×W×3 or N×3 uint8 pixels."""
    return plane_moments(np.ascontiguousarray(np.asarray(pixels, dtype=np.uint8).reshape(-1, 3).T))


def merge(partials: Iterable[Moments]) -> Moments:
    total = Moments()
    for p in partials:
        total = total + p
    return total


def pca_from_moments(m: Moments, source_manifest_sha256: str) -> Pca:
    """mean, std, covariance and eigen-pairs in [0,1] pixel units, as pca.json holds them. Plain Python floats
    throughout (see `symmetric_eigen`): the bytes of pca.json, which key `train` and `ablate`, are the same on every
    CPU."""
    if m.pixels == 0:
        raise ValueError("no pixels: cannot compute PCA")
    n, s = m.pixels, m.sum
    # n²·cov·255² = n·Σxx − Σx Σxᵀ, exact in Python integers; one float division at the end
    scale = float(n) * float(n) * 255.0**2
    cov = [[float(n * m.sumsq[i][j] - s[i] * s[j]) / scale for j in range(3)] for i in range(3)]
    eigvals, eigvecs = symmetric_eigen(cov)
    return Pca(pixel_scale="0-1", pixels=n, images=m.images, mean=tuple(float(v) / (n * 255.0) for v in s),
               std=tuple(math.sqrt(cov[i][i]) for i in range(3)), cov=tuple(map(tuple, cov)),
               eigvals=tuple(eigvals), eigvecs=tuple(map(tuple, eigvecs)),  # column i = eigenvector i
               source_manifest_sha256=source_manifest_sha256)


JACOBI_SWEEPS = 50  # a 3×3 converges in 4–6; the cap only bounds a pathological input


def symmetric_eigen(matrix: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues (descending) and eigenvectors (columns, each with its largest-magnitude component positive) of a
    symmetric 3×3 matrix: cyclic Jacobi rotations in a fixed order on Python floats, using only + − × ÷ and √.
    IEEE-754 rounds each of those exactly, so the result is the same bits on every CPU; `np.linalg.eigh`'s last
    bits depend on the BLAS kernel OpenBLAS picks for the CPU (SkylakeX differs from Haswell), and pca.json's digest
    keys every training run. Numerical Recipes' `jacobi`: an off-diagonal entry that no longer changes either
    diagonal entry it couples is set to zero instead of rotated."""
    a = [[float(x) for x in row] for row in matrix]
    v = [[1.0 if i == j else 0.0 for j in range(3)] for i in range(3)]
    for sweep in range(JACOBI_SWEEPS):
        if a[0][1] == a[0][2] == a[1][2] == 0.0:
            break
        for p, q in ((0, 1), (0, 2), (1, 2)):
            apq = a[p][q]
            g = 100.0 * abs(apq)
            if sweep > 3 and abs(a[p][p]) + g == abs(a[p][p]) and abs(a[q][q]) + g == abs(a[q][q]):
                a[p][q] = a[q][p] = 0.0
                continue
            if apq == 0.0:
                continue
            h = a[q][q] - a[p][p]
            if abs(h) + g == abs(h):
                t = apq / h  # t = 1/(2θ): θ² would overflow
            else:
                theta = 0.5 * h / apq
                t = 1.0 / (abs(theta) + math.sqrt(1.0 + theta * theta))
                if theta < 0.0:
                    t = -t
            c = 1.0 / math.sqrt(1.0 + t * t)
            s = t * c
            tau = s / (1.0 + c)
            h = t * apq
            a[p][p] -= h
            a[q][q] += h
            a[p][q] = a[q][p] = 0.0
            r = 3 - p - q  # the third index
            g, h = a[r][p], a[r][q]
            a[r][p] = a[p][r] = g - s * (h + g * tau)
            a[r][q] = a[q][r] = h + s * (g - h * tau)
            for row in v:
                g, h = row[p], row[q]
                row[p] = g - s * (h + g * tau)
                row[q] = h + s * (g - h * tau)
    order = sorted(range(3), key=lambda i: -a[i][i])  # stable: equal eigenvalues keep their index order
    columns = []
    for i in order:
        column = [v[r][i] for r in range(3)]
        largest = max(range(3), key=lambda r: abs(column[r]))  # the first of equal magnitudes
        columns.append([-x if column[largest] < 0 else x for x in column])
    return [a[i][i] for i in order], [[columns[c][r] for c in range(3)] for r in range(3)]


ORTHONORMAL_TOL = 1e-3  # eigenvectors published to 4 decimals (Krizhevsky's, fb.resnet's) are off by ~5e-5


def check_pca(pca: Pca, path: Path, tol: float = 1e-6) -> None:
    """What the lighting augmentation relies on, checked when pca.json is read: finite values of the right shapes,
    cov symmetric positive semi-definite, eigenvalues non-negative and descending, eigvecs orthonormal and
    eigvecs·diag(eigvals)·eigvecsᵀ = cov. `tol` is relative to the covariance's largest entry (float64 round-off,
    not a licence for wrong numbers)."""

    def fail(expected: str, found: str) -> None:
        raise PipeError(f"{path}: expected {expected}, found {found}; rerun `alexnet-pipe pca-stats --force`")

    if pca.pixel_scale != "0-1":
        fail("pixel_scale '0-1'", repr(pca.pixel_scale))
    arrays = {}
    for name, shape in (("mean", (3,)), ("std", (3,)), ("eigvals", (3,)), ("cov", (3, 3)), ("eigvecs", (3, 3))):
        try:
            arrays[name] = np.asarray(getattr(pca, name), dtype=np.float64)
        except (TypeError, ValueError):
            arrays[name] = np.array([])
        if arrays[name].shape != shape or not np.isfinite(arrays[name]).all():
            fail(f"{name} as {'×'.join(map(str, shape))} finite numbers", repr(getattr(pca, name)))
    cov, vals, vecs = arrays["cov"], arrays["eigvals"], arrays["eigvecs"]
    scale = max(float(np.abs(cov).max()), 1e-12)
    if np.abs(cov - cov.T).max() > tol * scale:
        fail("a symmetric covariance", f"cov - covᵀ up to {np.abs(cov - cov.T).max():.3g}")
    if (lowest := float(np.linalg.eigvalsh((cov + cov.T) / 2).min())) < -tol * scale:
        fail("a positive semi-definite covariance", f"an eigenvalue of cov of {lowest:.3g}")
    if vals.min() < -tol * scale or (np.diff(vals) > tol * scale).any():
        fail("eigenvalues non-negative and descending", f"{vals.tolist()}")
    if np.abs(vecs.T @ vecs - np.eye(3)).max() > ORTHONORMAL_TOL:
        fail("orthonormal eigenvectors (columns)", f"eigvecsᵀ·eigvecs off the identity by "
             f"{np.abs(vecs.T @ vecs - np.eye(3)).max():.3g}")
    if (err := float(np.abs(vecs @ np.diag(vals) @ vecs.T - cov).max())) > tol * scale:
        fail("eigvecs·diag(eigvals)·eigvecsᵀ = cov", f"a difference of {err:.3g}")


PCA_SAME_TOL = 1e-9  # beyond float64 round-off of an eigen-solver, far below any change of the data


def pca_difference(a: PixelStats, b: PixelStats) -> float:
    """The largest difference between two PCAs' mean, eigenvalues and eigenvectors ([0,1] units; eigenvalues
    relative to the largest): two solvers' round-off is ~1e-16, other pixels are far above PCA_SAME_TOL."""
    scale = max(abs(v) for v in a.eigvals) or 1.0
    pairs = [*zip(a.mean, b.mean), *((x / scale, y / scale) for x, y in zip(a.eigvals, b.eigvals)),
             *((x, y) for ra, rb in zip(a.eigvecs, b.eigvecs) for x, y in zip(ra, rb))]
    return max(abs(x - y) for x, y in pairs)


def shard_images(tar_path: Path, keep: set[int] | None = None) -> Iterator[np.ndarray]:
    """Decoded RGB planes (3×N uint8) of a shard's images in tar order (only sample positions in `keep`)."""
    from PIL import Image

    with tarfile.open(tar_path) as tar:
        position = -1
        for member in tar:
            if not member.name.endswith(".jpg"):
                continue
            position += 1
            if keep is not None and position not in keep:
                continue
            data = tar.extractfile(member)
            assert data is not None  # a shard holds regular files only
            with Image.open(io.BytesIO(data.read())) as img:
                rgb = img.convert("RGB") if img.mode != "RGB" else img
                yield np.stack([np.asarray(band).reshape(-1) for band in rgb.split()])


def shard_moments(tar_path: Path, keep: set[int] | None = None) -> Moments:
    return merge(plane_moments(px) for px in shard_images(tar_path, keep))


def subsample(shard_sizes: list[int], max_images: int | None, seed: int) -> list[set[int] | None]:
    """A seeded choice of `max_images` images over the whole shard set, as per-shard sample positions."""
    total = sum(shard_sizes)
    if max_images is None or max_images >= total:
        return [None] * len(shard_sizes)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=max_images, replace=False))
    starts = np.cumsum([0, *shard_sizes])
    return [set((chosen[(chosen >= a) & (chosen < b)] - a).tolist()) for a, b in zip(starts, starts[1:])]


