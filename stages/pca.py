"""Stage `pca-stats`: exact RGB PCA over the training shards → pca.json. Units: one moments partial per shard."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.engine import Input, QuietReporter, Reporter, Stage, StageResult, task_slice, write_json
from pipeline.errors import PipeError
from pipeline.pca import Moments, merge, pca_from_moments, shard_moments, subsample
from pipeline.records import MANIFEST, PCA, Manifest

# 2: eigen-pairs by a fixed-order Jacobi on Python floats (the same bytes on every CPU; 1 used LAPACK's eigh). The
# per-shard partials are unchanged, so a folder finished at version 1 keeps them and only the reduce runs again.
VERSION = 2
UNIT_VERSIONS = (1,)
# The digest of this stage's output at VERSION (tests/test_golden.py): output that changes needs a bump.
GOLDEN = {"version": 2,
          "demo": "8e2947844407c92da8b97000ca93b1f718212ddc8d714a136ac1d7cd195db158",
          "samples": "76aab226af39ef3a4a5152ff295f56bdace89eb755b76c1a32a887ad609dd8c9"}


@dataclass(frozen=True)
class _PartialJob:
    shard_dir: str
    keep: tuple[tuple[str, tuple[int, ...] | None], ...]  # shard name → sample positions (None: all)

    def __call__(self, unit: str) -> Moments:
        keep = dict(self.keep)[unit]
        return shard_moments(Path(self.shard_dir) / f"{unit}.tar", None if keep is None else set(keep))


def run(shard_dir: Path, out: Path, *, max_images: int | None = None, seed: int = 0, workers: int | None = None,
        task_index: int | None = None, num_tasks: int | None = None, force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    """The product is the Pca (None when up to date, or when this array task left partials to others)."""
    reporter = reporter or QuietReporter()
    manifest = Manifest.read(shard_dir)
    if manifest.samples == 0:
        raise PipeError(f"{shard_dir}: expected shards holding images, found none (the shard stage wrote 0 samples: "
                        "see its skipped and ignored lists in manifest.json)")
    if manifest.split != "train":
        reporter.warn(f"{shard_dir} holds the {manifest.split!r} split; the paper's PCA is over train")
    if max_images is not None and max_images < 1:
        raise PipeError(f"expected at least 1 image, got {max_images}", option="max_images")
    shards_input = Input.of_stage(shard_dir, MANIFEST)
    params = {"max_images": max_images, "seed": seed if max_images is not None else None}
    stage = Stage("pca-stats", VERSION, out, params, {"shards": shards_input}, product=PCA,
                  outputs=(PCA,), unit_versions=UNIT_VERSIONS)
    names = [s.name.removesuffix(".tar") for s in manifest.shards]
    return stage.execute(lambda: _moments_then_pca(stage, shard_dir, manifest, names, max_images, seed,
                                                   workers or os.cpu_count() or 1, task_index, num_tasks, reporter),
                         say=reporter, force=force, shown=out / PCA, units=names, exclusive=task_index is None,
                         splittable=True)


def _moments_then_pca(stage: Stage, shard_dir: Path, manifest: Manifest, names: list[str], max_images: int | None,
                      seed: int, workers: int, task_index: int | None, num_tasks: int | None,
                      reporter: Reporter) -> StageResult:
    """This task's moments partials; once every partial exists, their exact sum's eigen-pairs → pca.json."""
    sizes = [s.samples for s in manifest.shards]
    keep = subsample(sizes, max_images, seed)
    job = _PartialJob(str(shard_dir), tuple((n, None if k is None else tuple(sorted(k))) for n, k in zip(names, keep)))
    mine = [names[i] for i in task_slice(len(names), task_index, num_tasks)]
    todo = [n for n in mine if not stage.unit_done(n)]
    count = {n: (size if k is None else len(k)) for n, size, k in zip(names, sizes, keep)}
    with reporter.progress("pca-stats", total=sum(count[n] for n in todo)) as advance:
        stage.run_units(todo, job, workers=workers, on_done=lambda unit, rec: advance(count[unit]),
                        wait_for_others=task_index is None)
    done = sum(stage.unit_done(n) for n in names)
    if done < len(names):
        reporter.info(f"pca-stats: task done; {done} of {len(names)} partials exist, pca.json is written when all do")
        return StageResult(stage.name, stage.out)
    total = merge(Moments.from_json(r) for r in stage.records(names).values())
    pca = pca_from_moments(total, stage.inputs["shards"].digest.removeprefix("sha256:"))
    finalized = stage.finalize(lambda: write_json(stage.out / PCA, pca.to_json()), images=pca.images)
    ev = ", ".join(f"{v:.4f}" for v in pca.eigvals)
    reporter.info(f"pca-stats: {pca.images} images, {pca.pixels} pixels; eigenvalues [{ev}] → {stage.out}")
    return StageResult(stage.name, stage.out, finished=finalized, product=pca)
