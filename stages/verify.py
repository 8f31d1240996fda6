"""`verify`: re-read every shard of a folder against its manifest (sha256, sample count, DALI index; with `decode`,
every image). Not cached: it is the check of what the cache trusts."""

from __future__ import annotations

from pathlib import Path

from pipeline.engine import QuietReporter, Reporter, StageResult
from pipeline.errors import VerifyFailed
from pipeline.records import Manifest
from pipeline.shards import verify_shards


def run(shard_dir: Path, *, decode: bool = False, reporter: Reporter | None = None) -> StageResult:
    """The product is the number of shards checked; any mismatch is a warning each, then VerifyFailed (exit 4)."""
    reporter = reporter or QuietReporter()
    total = len(Manifest.read(shard_dir).shards)
    with reporter.progress("verify", total=total) as advance:
        problems = verify_shards(shard_dir, decode=decode, on_shard=lambda _: advance(1))
    for problem in problems:
        reporter.warn(problem)
    if problems:
        raise VerifyFailed(f"{shard_dir}: {len(problems)} problem(s) in {total} shards")
    reporter.info(f"verify: {total} shards match the manifest{' and decode' if decode else ''}")
    return StageResult("verify", shard_dir, finished=True, product=total)
