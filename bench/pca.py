"""Benchmark `pca`: moments over shard images vs JPEG decode alone of the same shards (the floor), one core.

    python bench/pca.py [--shards DIR] [--repeat N]

Without --shards, the real ImageNet samples (../shared/data/imagenet-sample) are sharded into a temp folder first.
Prints a table and one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.pca import merge, shard_moments
from pipeline.shards import shard_paths

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def best_rate(fn, tars: list[Path], images: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(tars)
        best = min(best, time.perf_counter() - t)
    return images / best


def jpegs(tars: list[Path]):
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            yield from (tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg"))


def decode_only(tars: list[Path]) -> None:
    for b in jpegs(tars):
        Image.open(io.BytesIO(b)).load()


def moments_of_shards(tars: list[Path]) -> None:
    merge(shard_moments(t) for t in tars)


def decode_and_float64_cov(tars: list[Path]) -> None:  # the naive numpy way, for context
    for b in jpegs(tars):
        x = np.asarray(Image.open(io.BytesIO(b)), dtype=np.float64).reshape(-1, 3) / 255.0
        np.cov(x, rowvar=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            from stages import shard

            shards = Path(tmp) / "train"
            shard.run(SAMPLE, shards, split="train", shard_size=64)
        tars = [t for t, _ in shard_paths(shards)]
        images = sum(1 for _ in jpegs(tars))
        rows = [(what, best_rate(fn, tars, images, args.repeat)) for what, fn in (
            ("decode only (floor)", decode_only), ("decode + exact moments (ours)", moments_of_shards),
            ("decode + np.cov float64 (naive)", decode_and_float64_cov))]
    floor = rows[0][1]
    print(f"{'pca, one core, ' + str(images) + ' shard images':<40} {'images/s':>10} {'vs floor':>9}")
    for what, rate in rows:
        print(f"{what:<40} {rate:>10.0f} {rate / floor:>8.0%}")
    for what, rate in rows:
        print(json.dumps({"bench": "pca", "what": what, "images_per_s": round(rate, 1),
                          "vs_decode_only": round(rate / floor, 3)}))


if __name__ == "__main__":
    main()
