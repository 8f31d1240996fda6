"""Benchmark `loader`: training images/s of the DALI pipeline vs the torch reference DataLoader (Pillow decode, same
augmentation: random crop of the central square, mirror, PCA lighting, mean subtraction), side by side, same cores;
and the DALI pipeline decoding whole images then cutting the crop (what the window decode buys).

    python bench/loader.py [--shards DIR] [--seconds S] [--device cpu|cuda] [--threads N] [--batch-size B]
                           [--ten-crop] [--resume]

--ten-crop measures the paper's 10-crop test loaders instead (every image once, ten views each; an image counts once).
--resume measures the time from a loader's start to its first batch when it resumes at the start of an epoch and
near its end (the epoch's order is computed, so a resume reads nothing it consumed: the two should be alike).

Without --shards, the real ImageNet samples (../shared/data/imagenet-sample) are sharded into a temp folder first.
The shard set is listed --repeat times over (symlinks) so that an epoch is long enough for the steady state; each
loader rebuilds per epoch exactly as in training. DALI gets --threads threads, the reference --threads workers.
The two run in alternating rounds; the ratio is the median of the per-round ratios (robust to a noisy machine).
Prints a table and one JSON line per loader.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from pipeline.augment import make_eval_loader, make_train_loader
from pipeline.engine import write_json
from pipeline.records import MANIFEST, LoaderPosition, Manifest, PixelStats

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
# ImageNet's published RGB statistics (the rate does not depend on them)
PCA = PixelStats(mean=(0.485, 0.456, 0.406), eigvals=(0.2175, 0.0188, 0.0045),
                 eigvecs=((0.5675, 0.7192, -0.4009), (0.5808, -0.0045, 0.8140), (0.5836, -0.6948, -0.4203)))


def repeated(shards: Path, out: Path, times: int) -> Path:
    """A shard folder listing `shards`' files `times` over (symlinks): a longer epoch of the same images."""
    manifest = Manifest.read(shards)
    entries = []
    out.mkdir(parents=True)
    for r in range(times):
        for s in manifest.shards:
            name = f"bench-{r:03d}-{s.name}"
            os.symlink((shards / s.name).resolve(), out / name)
            os.symlink((shards / s.name).with_suffix(".idx").resolve(), (out / name).with_suffix(".idx"))
            entries.append(replace(s, name=name))
    write_json(out / MANIFEST, replace(manifest, shards=tuple(entries), samples=manifest.samples * times).to_json())
    return out


def rate(loader, seconds: float, device: str, first_epoch: int) -> tuple[float, int]:
    """Images/s over `seconds` from the second batch on (start-up excluded; epoch ends and rebuilds included)."""
    images, started, epoch = 0, None, first_epoch
    while True:
        if hasattr(loader, "set_epoch"):  # a training loader; an eval loader is the same every pass
            loader.set_epoch(epoch)
        for batch, _ in loader:
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            if started is None:
                started = time.perf_counter()
                continue
            images += len(batch)
            if time.perf_counter() - started >= seconds:
                return images / (time.perf_counter() - started), images
        epoch += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path)
    ap.add_argument("--seconds", type=float, default=20.0, help="measuring time per loader (all rounds)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (DALI decodes with device=mixed)")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads / DataLoader workers")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=30, help="list the shard set this many times over")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved measuring rounds per loader")
    ap.add_argument("--ten-crop", action="store_true", help="the 10-crop test loaders instead of training's")
    ap.add_argument("--resume", action="store_true",
                    help="time to the first batch, resumed at an epoch's start and near its end")
    args = ap.parse_args()
    if args.resume:
        return resume_times(args)
    with tempfile.TemporaryDirectory() as tmp:
        shards = bench_shards(args, Path(tmp))
        make = partial(make_eval_loader, ten_crop=True) if args.ten_crop else make_train_loader
        loaders = {name: make(shards, PCA, args.batch_size, loader=name, device=args.device,
                              num_threads=args.threads) for name in ("dali", "torch")}
        if not args.ten_crop:  # the same DALI graph decoding whole images, then cutting the crop
            loaders["dali-full-decode"] = make(shards, PCA, args.batch_size, loader="dali", device=args.device,
                                               num_threads=args.threads, window_decode=False)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        images = dict.fromkeys(loaders, 0)
        for r in range(args.rounds):  # interleaved, so that a noisy neighbour hits each alike
            for name in (list(loaders) if r % 2 == 0 else list(reversed(loaders))):
                per_s, n = rate(loaders[name], args.seconds / args.rounds, args.device, first_epoch=1000 * r)
                rates[name].append(per_s)
                images[name] += n
        del loaders
    median = {name: statistics.median(v) for name, v in rates.items()}
    paired = {name: statistics.median(d / t for d, t in zip(v, rates["torch"], strict=True))
              for name, v in rates.items()}
    kind = "10-crop" if args.ten_crop else "train"
    title = f"loader {kind}, {args.device}, {args.threads} threads/workers, batch {args.batch_size}"
    print(f"{title:<48} {'images/s':>10} {'vs torch':>9}   (median of {args.rounds} interleaved rounds)")
    labels = {"dali": "DALI pipeline (ours)", "torch": "torch DataLoader + Pillow (reference)",
              "dali-full-decode": "DALI, whole image decoded, then cut"}
    for name, per_s in median.items():
        ratio = paired[name]
        rounds = ", ".join(f"{v:.0f}" for v in rates[name])
        print(f"{labels[name]:<48} {per_s:>10.0f} {ratio:>8.2f}x   rounds: {rounds}")
    for name, per_s in median.items():
        print(json.dumps({"bench": "loader", "kind": kind, "loader": name, "device": args.device,
                          "threads": args.threads,
                          "batch_size": args.batch_size, "images": images[name], "images_per_s": round(per_s, 1),
                          "vs_torch": round(paired[name], 3),
                          "rounds": [round(v, 1) for v in rates[name]]}))


def bench_shards(args: argparse.Namespace, tmp: Path) -> Path:
    """--shards (default: the real samples, sharded into `tmp`), repeated --repeat times."""
    shards = args.shards
    if shards is None:
        from stages import shard

        shards = tmp / "train"
        shard.run(SAMPLE, shards, split="train", shard_size=64)
    return repeated(shards, tmp / "bench", args.repeat)


def resume_times(args: argparse.Namespace) -> None:
    """Seconds from building a training loader to its first batch, resumed at global batch 0 and at the epoch's
    last batch but one (median of --rounds, alternating)."""
    with tempfile.TemporaryDirectory() as tmp:
        shards = bench_shards(args, Path(tmp))
        times: dict[str, dict[int, list[float]]] = {}
        for name in ("dali", "torch"):
            loader = make_train_loader(shards, PCA, args.batch_size, loader=name, device=args.device,
                                       num_threads=args.threads)
            at = {0: [], len(loader) - 2: []}
            for r in range(args.rounds):
                for batch in (sorted(at) if r % 2 == 0 else sorted(at, reverse=True)):
                    loader.set_epoch(r)
                    loader.load_state_dict(LoaderPosition(r, batch))
                    started = time.perf_counter()
                    next(iter(loader))
                    at[batch].append(time.perf_counter() - started)
            times[name] = at
    for name, at in times.items():
        near_end = max(at)
        first, last = statistics.median(at[0]), statistics.median(at[near_end])
        print(f"resume {name}: first batch after {first:.3f} s at batch 0, {last:.3f} s at batch {near_end} "
              f"of {near_end + 2}: ratio {last / first:.2f}")
        print(json.dumps({"bench": "loader-resume", "loader": name, "batches_per_epoch": max(at) + 2,
                          "first_batch_s_at_start": round(first, 4), "first_batch_s_near_end": round(last, 4),
                          "ratio": round(last / first, 3)}))


if __name__ == "__main__":
    main()
