"""Shared fixtures: the real ImageNet samples in ../shared/data and shard sets built from them by the real stage."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ALEXNET_PIPE_SHARED", REPO.parent / "shared"))
SAMPLE = SHARED / "data" / "imagenet-sample"
META = SHARED / "data" / "imagenet-meta"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not SAMPLE.is_dir():
        pytest.fail(f"test data not found at {SAMPLE} (set ALEXNET_PIPE_SHARED to the shared/ folder)")
    return SAMPLE


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory, sample_dir) -> Path:
    """The samples as an extracted ImageNet tree with its val labels: train/<wnid>/, val/, LOC_val_solution.csv."""
    root = tmp_path_factory.mktemp("imagenet-tree")
    shutil.copytree(sample_dir / "train", root / "train")
    shutil.copytree(sample_dir / "val", root / "val")
    shutil.copy(META / "LOC_val_solution.csv", root)
    return root


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, sample_tree) -> dict[str, Path]:
    """Train (210 images, shards of 64) and val (50 images, shards of 16) shard folders from the real samples."""
    from stages import shard

    out = tmp_path_factory.mktemp("shards")
    shard.run(sample_tree, out / "train", split="train", shard_size=64, workers=2)
    shard.run(sample_tree, out / "val", split="val", shard_size=16, workers=2)
    return {"train": out / "train", "val": out / "val"}
