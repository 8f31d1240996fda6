"""Benchmark `shard`: images/s per core of our `prepare_image` vs JPEG decode alone of the same files (the floor) and
a naive Pillow pipeline on the same Pillow build, all in one process; then the shard stage end to end with
--workers 1 and 2.

    python bench/shard.py [--images DIR] [--repeat N] [--copies K]

DIR defaults to the real ImageNet samples (../shared/data/imagenet-sample). Every measurement is the best of N
interleaved rounds, so a busy machine slows all contenders alike. The stage runs on DIR's train split copied K
times under new names (so both workers have enough shards to keep busy). Prints a table and one JSON line per
measurement.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from pipeline.images import prepare_image, resized_size

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
SUFFIXES = (".jpeg", ".jpg", ".png")


def decode_only(data: list[bytes]) -> None:
    for b in data:
        Image.open(io.BytesIO(b)).load()


def naive_pillow(data: list[bytes]) -> None:
    for b in data:
        img = Image.open(io.BytesIO(b)).convert("RGB")
        img = img.resize(resized_size(*img.size, 256), Image.Resampling.BICUBIC)
        img.save(io.BytesIO(), "JPEG", quality=95)


def ours(data: list[bytes]) -> None:
    for b in data:
        prepare_image(b, short_side=256, quality=95)


def best_rates(contenders: dict[str, Callable[[], int]], repeat: int) -> dict[str, float]:
    """Run every contender once per round, `repeat` rounds; return images/s of each one's fastest round."""
    best = dict.fromkeys(contenders, 0.0)
    for _ in range(repeat):
        for what, fn in contenders.items():
            start = time.perf_counter()
            images = fn()
            best[what] = max(best[what], images / (time.perf_counter() - start))
    return best


def copied_train_tree(images: Path, dest: Path, copies: int) -> int:
    """DIR's train/<wnid>/ files (or DIR's own <wnid>/ folders) `copies` times under new stems; returns the count."""
    train = images / "train" if (images / "train").is_dir() else images
    count = 0
    for f in sorted(train.glob("*/*")):
        if f.suffix.lower() not in SUFFIXES:
            continue
        (dest / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            shutil.copy(f, dest / "train" / f.parent.name / f"{f.stem}_copy{k}{f.suffix}")
            count += 1
    return count


def stage_run(source: Path, out: Path, workers: int, images: int, shard_size: int) -> Callable[[], int]:
    from stages import shard

    def run() -> int:
        shutil.rmtree(out, ignore_errors=True)
        shard.run(source, out, split="train", shard_size=shard_size, workers=workers)
        return images

    return run


class PeakWorkerRSS:
    """Samples the peak RSS (VmHWM) of every process below this one (the stage's pool workers) while it runs."""

    def __init__(self, every: float = 0.05):
        self.every, self.peaks, self._stop = every, {}, threading.Event()

    def __enter__(self) -> PeakWorkerRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def max_mb(self) -> float:
        return max(self.peaks.values(), default=0) / 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            parents = {}
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                    parents[int(stat.parent.name)] = int(fields[1])
                except (OSError, IndexError, ValueError):
                    continue
            for pid in parents:
                up = pid
                while up in parents and up != os.getpid():
                    up = parents[up]
                if up == os.getpid() and pid != os.getpid():
                    try:
                        hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                                   if line.startswith("VmHWM:"))
                        self.peaks[pid] = max(self.peaks.get(pid, 0), int(hwm.split()[1]))
                    except (OSError, StopIteration):
                        continue


def worker_memory(images_dir: Path, tmp: Path, copies: list[int], shard_size: int) -> dict[int, tuple[int, float]]:
    """Peak RSS of the busiest --workers 2 process for the train split copied k times: flat when no worker holds
    the whole listing (each reads its own shard's member list)."""
    from stages import shard

    result = {}
    for k in copies:
        source, out = tmp / f"mem-src{k}", tmp / f"mem-out{k}"
        images = copied_train_tree(images_dir, source, k)
        with PeakWorkerRSS() as rss:
            shard.run(source, out, split="train", shard_size=shard_size, workers=2)
        result[k] = (images, rss.max_mb)
        shutil.rmtree(source)
        shutil.rmtree(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=SAMPLE, help="folder of images (searched recursively)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds; the best round counts")
    ap.add_argument("--copies", type=int, default=16,
                    help="copies of the train split for the stage runs (long enough that pool start-up and the "
                         "last shard's tail, ~0.1 s each, do not dominate)")
    ap.add_argument("--shard-size", type=int, default=64, help="samples per shard in the stage runs")
    ap.add_argument("--memory-copies", default="1,32", help="copies for the worker peak-RSS runs ('' skips them)")
    args = ap.parse_args()

    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    data = [p.read_bytes() for p in files]
    n = len(data)
    one_core = best_rates({"decode only (floor)": lambda: decode_only(data) or n,
                           "naive Pillow (convert→resize→save)": lambda: naive_pillow(data) or n,
                           "ours: prepare_image": lambda: ours(data) or n}, args.repeat)

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        source = Path(tmp) / "src"
        images = copied_train_tree(args.images, source, args.copies)
        stage = best_rates({f"shard stage, --workers {w}": stage_run(source, Path(tmp) / f"out{w}", w, images,
                                                                    args.shard_size) for w in (1, 2)},
                           max(1, args.repeat // 2))
        memory = worker_memory(args.images, Path(tmp), [int(k) for k in args.memory_copies.split(",") if k],
                               args.shard_size)

    floor, naive = one_core["decode only (floor)"], one_core["naive Pillow (convert→resize→save)"]
    rows = [(what, rate, 1, n) for what, rate in one_core.items()]
    rows += [(what, rate, int(what.rsplit(" ", 1)[1]), images) for what, rate in stage.items()]
    print(f"shard benchmark: {n} images from {args.images}; stage on {images} train images "
          f"(x{args.copies}), Pillow {Image.__version__}, {os.cpu_count()} cores")
    print(f"{'what':<38} {'images':>6} {'img/s':>8} {'img/s/core':>10} {'vs decode':>9} {'vs naive':>9}")
    for what, rate, cores, count in rows:
        print(f"{what:<38} {count:>6} {rate:>8.0f} {rate / cores:>10.0f} {rate / cores / floor:>8.0%} "
              f"{rate / cores / naive:>8.0%}")
    w1, w2 = stage["shard stage, --workers 1"], stage["shard stage, --workers 2"]
    print(f"speed-up from 1 to 2 workers: {w2 / w1:.2f}x")
    for what, rate, cores, count in rows:
        print(json.dumps({"bench": "shard", "what": what, "images_per_s": round(rate, 1), "workers": cores,
                          "images_per_s_per_core": round(rate / cores, 1), "images": count,
                          "vs_decode_only": round(rate / cores / floor, 3), "vs_naive": round(rate / cores / naive, 3)},
                         ensure_ascii=False))
    for k, (count, mb) in memory.items():
        print(f"worker peak RSS, --workers 2, train split x{k} ({count} images): {mb:.0f} MB")
    print(json.dumps({"bench": "shard", "what": "speed-up 1→2 workers", "speedup": round(w2 / w1, 3)},
                     ensure_ascii=False))
    for k, (count, mb) in memory.items():
        print(json.dumps({"bench": "shard", "what": "worker peak RSS", "copies": k, "images": count,
                          "peak_rss_mb": round(mb, 1)}))


if __name__ == "__main__":
    main()
