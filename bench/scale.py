"""What the data stages cost at ImageNet scale: an ILSVRC-shaped train archive (1,000 inner class tars) of tiny
members, sharded at --short-side 16, then every data command on it, each a separate process with its peak RSS.

    python bench/scale.py [--members 128117 1281167] [--workers 2] [--work DIR] [--keep]

For each size: build ILSVRC2012_img_train.tar (not timed), then time the index unit alone, the whole shard stage
(index included), the up-to-date check (a second `shard`), `status`, `verify` and `pca-stats`, each after a
`sync`, with the 1-minute load average at its end. The members are tiny so the figures show the stages' own costs
(listing, bookkeeping, tar and index writing, hashing), not JPEG decoding, which bench/shard.py measures. Not part
of `make test`. Prints a table and one JSON line per figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.sources import ilsvrc2012_classes

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("alexnet-pipe"))
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def tiny_jpegs(n: int = 64) -> list[bytes]:
    """A few distinct 24×16 JPEGs (a few hundred bytes each), reused for every member."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (24, 16), (i * 4 % 256, 255 - i * 3 % 256, i * 7 % 256)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_train_archive(path: Path, members: int) -> None:
    """ILSVRC2012_img_train.tar: one class tar per wnid, `members` images spread evenly over the 1,000 classes."""
    jpegs = tiny_jpegs()
    wnids = ilsvrc2012_classes().wnids
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as outer:
        for c, wnid in enumerate(wnids):
            count = members * (c + 1) // len(wnids) - members * c // len(wnids)
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for i in range(count):
                    data = jpegs[(c + i) % len(jpegs)]
                    info = tarfile.TarInfo(f"{wnid}_{i}.JPEG")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = inner.tell()
            inner.seek(0)
            outer.addfile(info, inner)


def timed(what: str, args: list[str]) -> dict:
    """Run one process to completion; wall seconds and the peak RSS of the largest process it (or a worker it
    reaped) had, from wait4. Dirty pages are written out first (the last step's writeback is not charged to this
    one), and the 1-minute load average at the end is kept beside the figure: on a shared 2-core machine another
    user's process running alongside inflates it, and inflates a long step more often than a short one."""
    os.sync()
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=ENV)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"{what} failed (exit {os.waitstatus_to_exitcode(status)}):\n{log.read().decode()}")
    return {"what": what, "seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "load": round(os.getloadavg()[0], 2)}


def index_unit(source: Path, out: Path) -> list[str]:
    """The shard stage's first unit alone (list the archive, fix the assignment, write the member lists)."""
    code = ("import sys; from stages.shard import _IndexJob; "
            "_IndexJob(sys.argv[1], sys.argv[2], 'train', None, 1000, 0)('index')")
    return [sys.executable, "-c", code, str(source), str(out)]


def measure(members: int, work: Path, workers: int) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    source, shards = work / "ilsvrc", work / "shards" / "train"
    source.mkdir(exist_ok=True)
    start = time.perf_counter()
    build_train_archive(source / "ILSVRC2012_img_train.tar", members)
    print(f"built a {members:,}-member train archive "
          f"({(source / 'ILSVRC2012_img_train.tar').stat().st_size / 2**20:,.0f} MiB) in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    shard = [CLI, "shard", str(source), str(shards), "--split", "train", "--short-side", "16",
             "--workers", str(workers)]
    rows = [timed("index unit", index_unit(source, work / "index-only")),
            timed("shard stage (whole)", shard),
            timed("shard up-to-date check", shard),
            timed("status", [CLI, "status", str(work)]),
            timed("verify", [CLI, "verify", str(shards)]),
            timed("pca-stats", [CLI, "pca-stats", str(shards), str(work / "pca"), "--workers", str(workers)])]
    for row in rows:
        row["members"] = members
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[128_117, 1_281_167])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="where to build (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the archives and shards")
    args = parser.parse_args()
    base = args.work or Path(tempfile.mkdtemp(prefix="alexnet-scale-"))
    rows = []
    try:
        for members in args.members:
            rows += measure(members, base / f"m{members}", args.workers)
            if not args.keep:
                shutil.rmtree(base / f"m{members}")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{'members':>10} {'step':<24} {'seconds':>8} {'peak RSS MB':>12} {'load':>5}")
    for r in rows:
        print(f"{r['members']:>10,} {r['what']:<24} {r['seconds']:>8.2f} {r['peak_rss_mb']:>12} {r['load']:>5.2f}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
