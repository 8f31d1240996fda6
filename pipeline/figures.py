"""The paper's figures from a checkpoint, computed by `eval` (the report only lays them out):

- Figure 3: conv1's kernels, per tower, and a number per tower that tells colour-agnostic kernels from
  colour-specific ones (§6.1: one tower largely colour-agnostic, the other colour-specific; which is arbitrary).
- Figure 4 (right): for a few val images, the training images whose last-hidden-layer vectors (fc7 after its ReLU,
  every tower, eval mode, centre crop) are nearest in Euclidean distance, found in one streaming pass.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from pipeline.records import Figure3, Figure4, Neighbour, PixelStats, Query, TowerKernels

if TYPE_CHECKING:
    from pipeline.model import AlexNet

NEIGHBOURS = 6  # Figure 4: six training images per query
QUERIES = 5  # Figure 4: five val images

_Id = TypeVar("_Id")  # what names a candidate in `nearest`


def chroma_energy(kernels: np.ndarray) -> np.ndarray:
    """Per kernel [K, 3, h, w]: the share of its energy off the grey axis, Σ(w − mean over RGB)² / Σw².
    0 for a kernel that weighs R, G and B alike (colour-agnostic); up to 1 for one that is pure colour contrast."""
    k = kernels.reshape(len(kernels), 3, -1).astype(np.float64)
    grey = k.mean(axis=1, keepdims=True)
    total = (k**2).sum(axis=(1, 2))
    return ((k - grey) ** 2).sum(axis=(1, 2)) / np.where(total > 0, total, 1.0)


def neighbour_correlation(kernels: np.ndarray) -> np.ndarray:
    """Per kernel [K, 3, h, w]: the correlation of each weight with its right and lower neighbours (same colour).
    About 0 for the independent draws of the initial weights; edges and colour blobs are smooth, so a kernel
    that learnt one is well above 0: the number that tells learnt structure from the initial noise."""
    k = kernels.astype(np.float64)
    k = k - k.mean(axis=(1, 2, 3), keepdims=True)
    pairs = [(k[:, :, :, :-1], k[:, :, :, 1:]), (k[:, :, :-1, :], k[:, :, 1:, :])]
    a = np.concatenate([p[0].reshape(len(k), -1) for p in pairs], axis=1)
    b = np.concatenate([p[1].reshape(len(k), -1) for p in pairs], axis=1)
    scale = np.sqrt((a**2).sum(axis=1) * (b**2).sum(axis=1))
    return (a * b).sum(axis=1) / np.where(scale > 0, scale, 1.0)


def figure3(model: AlexNet, initial: AlexNet | None = None) -> Figure3:
    """conv1's kernels of each tower (tower A first), each tower's mean chroma energy and mean neighbour
    correlation (also of `initial`, the run's weights at step 0); `differ` when the towers' chroma means are more
    than two standard errors apart."""
    towers = []
    starts = [t.conv1.weight.detach().float().cpu().numpy() for t in initial.towers] if initial is not None else []
    for i, tower in enumerate(model.towers):
        w = tower.conv1.weight.detach().float().cpu().numpy()
        chroma = chroma_energy(w)
        towers.append(TowerKernels(np.round(w, 6).tolist(), tuple(round(float(c), 6) for c in chroma),
                                   round(float(chroma.mean()), 6),
                                   round(float(neighbour_correlation(w).mean()), 6),
                                   round(float(neighbour_correlation(starts[i]).mean()), 6) if starts else None))
    differ = None
    if len(towers) == 2:
        a, b = (np.array(t.chroma) for t in towers)
        se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) if min(len(a), len(b)) > 1 else 0.0
        differ = bool(abs(a.mean() - b.mean()) > 2 * se)
    return Figure3(tuple(towers), "mean chroma energy of conv1's kernels, Σ(w − grey)²/Σw²", differ)


@torch.no_grad()
def features(model: AlexNet, images: torch.Tensor) -> torch.Tensor:
    """The last hidden layer (fc7 after its ReLU, every tower) in eval mode, float32 on the CPU."""
    model.eval()
    return model.features(images.to(model.fc8.weight.device)).float().cpu()


def nearest(queries: torch.Tensor, candidates: Iterable[tuple[list[_Id], torch.Tensor]], k: int = NEIGHBOURS
            ) -> list[list[tuple[float, _Id]]]:
    """For each query vector, the k candidates nearest in Euclidean distance, as (distance, id), nearest first.
    `candidates` yields (ids, vectors) batches; only the running k best per query are kept."""
    best_d = torch.full((len(queries), 0), math.inf, dtype=torch.float64)
    best_i = torch.zeros((len(queries), 0), dtype=torch.int64)
    kept: dict[int, _Id] = {}  # candidate number → id, for the candidates some query keeps
    offset = 0
    for batch_ids, vectors in candidates:
        d = torch.cdist(queries.double(), vectors.double())
        index = torch.arange(offset, offset + len(batch_ids)).expand(len(queries), -1)
        d, index = torch.cat([best_d, d], 1), torch.cat([best_i, index], 1)
        order = torch.sort(d, dim=1, stable=True).indices[:, :k]  # ties: the earlier candidate first
        best_d, best_i = d.gather(1, order), index.gather(1, order)
        pool = {**kept, **{offset + j: i for j, i in enumerate(batch_ids)}}
        kept = {n: pool[n] for n in set(best_i.flatten().tolist())}
        offset += len(batch_ids)
    return [[(float(dist), kept[i]) for dist, i in zip(ds.tolist(), ix.tolist())] for ds, ix in zip(best_d, best_i)]


def batched(samples: Iterator, size: int) -> Iterator[list]:
    """Lists of `size` items (the last shorter); itertools.batched is Python 3.12's."""
    while batch := list(itertools.islice(samples, size)):
        yield batch


def figure4(model: AlexNet, val_dir: Path, train_dir: Path, pixels: PixelStats, crop: int, *,
            limit: int, batch_size: int = 64) -> Figure4:
    """The first QUERIES val images and, for each, its NEIGHBOURS nearest among the first `limit` training images
    (in shard order), streamed in batches."""
    from pipeline.augment import reference_eval_samples

    queries = list(reference_eval_samples(val_dir, pixels, crop=crop, limit=QUERIES))
    query_vectors = features(model, torch.stack([image for _, image, _ in queries]))
    seen = {"images": 0}

    def candidates() -> Iterator[tuple[list[tuple[str, int]], torch.Tensor]]:
        for batch in batched(reference_eval_samples(train_dir, pixels, crop=crop, limit=limit), batch_size):
            seen["images"] += len(batch)
            yield [(key, label) for key, _, label in batch], features(model, torch.stack([b[1] for b in batch]))

    found = nearest(query_vectors, candidates())
    return Figure4(str(train_dir), seen["images"], limit, "fc7 after ReLU, every tower, eval mode, centre crop",
                   tuple(Query(key, int(label), tuple(Neighbour(n[0], int(n[1]), round(d, 6)) for d, n in row))
                         for (key, _, label), row in zip(queries, found)))
