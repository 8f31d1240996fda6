"""The augmentation's math, shared by the DALI graphs and the torch reference path (paper §4.1): where the crops lie,
the lighting offset, and which samples a rank evaluates (the training order is `order.py`'s). No DALI, no torch.

The crop geometry is plain integer arithmetic (`-`, `//`), so `centre_inset` and `ten_crop_offsets` take Python ints
and DALI data nodes alike: the DALI graphs place their patches with the very functions the reference path uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.config import AlexNetConfig

CROP = AlexNetConfig.crop  # the model's default input side (§4.1: 224)
LIGHTING_ALPHA_STD = 0.1  # §4.1: "Gaussian with mean zero and standard deviation 0.1"
TEN_CROP_VIEWS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre",
                  "top-left mirrored", "top-right mirrored", "bottom-left mirrored", "bottom-right mirrored",
                  "centre mirrored")


def centre_inset(outer, inner):
    """Offset of a centred `inner` span inside an `outer` one (ints or DALI nodes): (outer − inner) // 2."""
    return (outer - inner) // 2


def ten_crop_offsets(side, crop) -> tuple:
    """(dx, dy) of the paper's five test patches inside the central square: the four corners, then the centre."""
    far, mid = side - crop, centre_inset(side, crop)
    return (0, 0), (far, 0), (0, far), (far, far), (mid, mid)


def ten_crop_views(side, crop) -> list:
    """((dx, dy), mirrored) of the 10 test patches in `TEN_CROP_VIEWS` order: the five patches, then them mirrored."""
    return [(offset, mirrored) for mirrored in (False, True) for offset in ten_crop_offsets(side, crop)]


def centre_square(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the image's central square; side = the short side (256 in our shards)."""
    side = min(width, height)
    return centre_inset(width, side), centre_inset(height, side), side


def centre_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre `crop` patch of the central square (test time, §4.1)."""
    left, top, side = centre_square(width, height)
    inset = centre_inset(side, crop)
    return left + inset, top + inset, left + inset + crop, top + inset + crop


def ten_crop_boxes(width: int, height: int, crop: int) -> list[tuple[tuple[int, int, int, int], bool]]:
    """The paper's 10 test patches as ((left, top, right, bottom), mirrored), in `TEN_CROP_VIEWS` order."""
    left, top, side = centre_square(width, height)
    return [((left + dx, top + dy, left + dx + crop, top + dy + crop), mirrored)
            for (dx, dy), mirrored in ten_crop_views(side, crop)]


def lighting_matrix(eigvals: Sequence[float], eigvecs: Sequence[Sequence[float]]) -> np.ndarray:
    """M with M @ α = the lighting offset: 255 · eigvecs · diag(eigvals) (eigvecs' columns are the eigenvectors)."""
    return 255.0 * np.asarray(eigvecs, dtype=np.float64) * np.asarray(eigvals, dtype=np.float64)[None, :]


def lighting_offset(alpha, eigvals, eigvecs):
    """§4.1: add `[p1, p2, p3][α1λ1, α2λ2, α3λ3]ᵀ` to every RGB pixel, here on the 0–255 scale. Returns a [3] array of
    alpha's kind (numpy, or a torch tensor of alpha's dtype and device)."""
    m = lighting_matrix(eigvals, eigvecs)
    if hasattr(alpha, "new_tensor"):  # a torch tensor, without importing torch here
        return alpha.new_tensor(m) @ alpha
    return m @ np.asarray(alpha, dtype=np.float64)


def rank_range(samples: int, rank: int, world_size: int) -> range:
    """Positions of the samples rank `rank` evaluates: a contiguous part, so every sample counts exactly once."""
    return range(samples * rank // world_size, samples * (rank + 1) // world_size)
