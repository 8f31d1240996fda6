"""Stage `shard`: an ImageNet split (official tars or extracted tree) → WebDataset shards at short side 256.

Units: `index` (list the source once, fix the seeded image→shard assignment, write one member list per shard),
then one unit per shard. The manifest is written when every shard exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import SHORT_SIDE
from pipeline.engine import Input, QuietReporter, Reporter, Stage, StageResult, task_slice, write_json
from pipeline.errors import PipeError
from pipeline.records import MANIFEST, TIMM_INFO, Manifest, ShardIndex, ShardUnit
from pipeline.shards import (
    ShardJob,
    assign_shards,
    build_manifest,
    cap_members,
    damaged_shards,
    shard_name,
    write_member_list,
    write_timm_info,
)
from pipeline.sources import ClassTable, find_layout, list_source, load_classes

VERSION = 1
# The digest of this stage's output at VERSION (tests/test_golden.py): output that changes needs a bump.
GOLDEN = {"version": 1,
          "demo-train": "2d65538be349461b2254de88f4e975b761895becda55fedd30f5196e667495a1",
          "demo-val": "7424e785d841480b91950ee5f2d4f5893cf4981efb9e906db4047d9c7146dcdd",
          "samples-train": "23c9c4edf7ae5c7150f27327ba36116ea14584fdb6ea11624543e5c6759ad7dd",
          "samples-val": "143d2e687aba90f4ff1e12e8624386ae271200aea7bc48390a4b4f888d1ffacd"}
LISTS = "_lists"


@dataclass
class ShardCounts:
    """The product of a shard run: what it wrote (the whole split once finished), and what it found damaged."""

    written: int = 0
    repaired: int = 0
    skipped: int = 0
    shards_done: int = 0
    shards_total: int = 0
    rewritten: tuple[str, ...] = ()  # shards found missing or resized by the up-to-date check, written again


def run(source: Path, out: Path, *, split: str, labels: Path | None = None, classes_file: Path | None = None,
        shard_size: int = 1000, workers: int | None = None, task_index: int | None = None,
        num_tasks: int | None = None, short_side: int = SHORT_SIDE, quality: int = 95, seed: int = 0,
        max_classes: int | None = None, per_class: int | None = None, force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    """`max_classes`/`per_class`: shard only the first classes (sorted wnids) and a seeded choice of images of each
    (`pipeline.shards.cap_members`)."""
    reporter = reporter or QuietReporter()
    _check_settings(split, quality, short_side, max_classes, per_class)
    if not source.exists():
        raise PipeError(f"source not found: {source}")
    if labels is not None and not labels.is_file():
        raise PipeError(f"labels file not found: {labels}")
    params = {"split": split, "shard_size": shard_size, "short_side": short_side, "quality": quality,
              "seed": seed, "classes": "ilsvrc2012" if classes_file is None else classes_file.name}
    caps = {k: v for k, v in (("max_classes", max_classes), ("per_class", per_class)) if v is not None}
    params |= caps  # only when given: the keys and manifests of uncapped shard sets stay as they were
    # Only the split's own archive or folder and its labels key the stage: sharding train is not made stale by a
    # change in val, and an OUT inside SOURCE (but outside the split) does not change the key.
    layout = find_layout(source, split, labels)
    if layout.path.is_dir() and out.resolve().is_relative_to(layout.path.resolve()):
        raise PipeError(f"{out}: expected an output folder outside the source split {layout.path} (shards written "
                        "inside it would change the source, so every run would shard it again)")
    inputs = {"source": Input.of_source(layout.path)}
    if layout.labels is not None:
        inputs["labels"] = Input.of_source(layout.labels)
    if classes_file is not None:
        inputs["classes"] = Input.of_source(classes_file)
    stage = Stage(f"shard-{split}", VERSION, out, params, inputs, product=MANIFEST, label=f"shard {split}",
                  outputs=(f"{split}-*.tar", f"{split}-*.idx", f"{LISTS}/*.jsonl", MANIFEST, TIMM_INFO))
    index = _IndexJob(str(source), str(out), split, str(layout.labels) if layout.labels else None, shard_size, seed,
                      max_classes, per_class)
    damaged: list[str] = []  # found by the up-to-date check: rewritten, exactly those

    def find_damage() -> list[str]:
        try:
            damaged[:] = damaged_shards(out, Manifest.read(out))
        except PipeError:  # missing or cut short: written again from the shards' unit records
            damaged[:] = [MANIFEST]
        if not damaged:
            write_timm_info(out)  # a folder sharded before timm's _info.json existed gets it without re-sharding
        return damaged

    return stage.execute(lambda: _shard(stage, index, damaged, load_classes(classes_file), caps,
                                        workers or os.cpu_count() or 1, task_index, num_tasks, reporter),
                         say=reporter, force=force, units=["index"], exclusive=task_index is None,
                         splittable=True, damaged=find_damage)


def _check_settings(split: str, quality: int, short_side: int, max_classes: int | None,
                    per_class: int | None) -> None:
    if split not in ("train", "val"):
        raise PipeError(f"expected train or val, got {split!r}", option="split")
    if not 1 <= quality <= 100:
        raise PipeError(f"expected a JPEG quality in 1..100, got {quality}", option="quality")
    if short_side < 1:
        raise PipeError(f"expected a positive short side, got {short_side}", option="short_side")
    for option, value in (("max_classes", max_classes), ("per_class", per_class)):
        if value is not None and value < 1:
            raise PipeError(f"expected at least 1, got {value}", option=option)


def _shard(stage: Stage, index_job: _IndexJob, damaged: list[str], classes: ClassTable, caps: dict,
           workers: int, task_index: int | None, num_tasks: int | None, reporter: Reporter) -> StageResult:
    """The index unit (the listing, once), then this task's shards; once every shard exists, the manifest."""
    out, split = stage.out, index_job.split
    if damaged == [MANIFEST]:
        reporter.warn(f"shard {split}: {MANIFEST} is missing or damaged; writing it again from the shards' records")
    elif damaged:
        reporter.warn(f"shard {split}: {len(damaged)} shard(s) missing or changed in size ({', '.join(damaged)}); "
                      "rewriting exactly those")
    if damaged:
        units = [name.removesuffix(".tar") for name in damaged if name.endswith(".tar")]
        lists_lost = any(not (out / LISTS / f"{u}.jsonl").is_file() for u in units)
        stage.reopen(units + ["index"] * lists_lost)  # a lost member list: the index unit writes them again
    stage.run_units(["index"], index_job)
    index = _said_index(stage, caps, reporter)
    names = [shard_name(split, i) for i in range(index.shards)]
    stage.plan(["index", *names])
    mine = [names[i] for i in task_slice(len(names), task_index, num_tasks)]
    job = ShardJob(str(out), split, index.source_root, str(out / LISTS), stage.params["short_side"],
                   stage.params["quality"], tuple((w, classes.label_of(w)) for w in sorted(index.wnids)))
    todo = [n for n in mine if not stage.unit_done(n)]
    if len(todo) < len(mine):
        reporter.info(f"shard {split}: {len(mine) - len(todo)} of {len(mine)} shards already written, kept")
    result = ShardCounts(shards_total=len(names), rewritten=tuple(damaged))
    with reporter.progress(f"shard {split}", total=sum(index.sizes[names.index(n)] for n in todo)) as advance:
        def on_done(unit: str, written: dict) -> None:
            record = ShardUnit.from_json(written)
            result.written += record.samples
            result.skipped += len(record.skipped)
            result.repaired += len(record.repaired)
            for s in record.skipped:
                reporter.warn(f"skipped {s.key} ({s.path}): {s.reason}")
            advance(record.samples + len(record.skipped))

        stage.run_units(todo, job, workers=workers, on_done=on_done, wait_for_others=task_index is None)
    result.shards_done = sum(stage.unit_done(n) for n in names)
    if result.shards_done < len(names):
        reporter.info(f"shard {split}: task wrote its shards; {result.shards_done} of {len(names)} exist, "
                      "the manifest is written when all do")
        return StageResult(stage.name, out, product=result)
    return _write_manifest(stage, names, index, classes, result, reporter)


def _said_index(stage: Stage, caps: dict, reporter: Reporter) -> ShardIndex:
    """The index unit's record, and what it kept, ignored and skipped said once."""
    index = ShardIndex.read(stage.unit_record_path("index"))
    if caps:
        reporter.info(f"{stage.label}: {index.images:,} of {index.listed or index.images:,} images "
                      f"kept ({', '.join(f'{k} {v}' for k, v in caps.items())})")
    for ignored in index.ignored:
        reporter.warn(f"ignored {ignored.name}: {ignored.reason}")
    for skipped in index.skipped:
        reporter.warn(f"skipped {skipped.path}: {skipped.reason}")
    if index.missing_classes:
        shown = ", ".join(index.missing_classes[:5]) + (" …" if len(index.missing_classes) > 5 else "")
        reporter.warn(f"{stage.label}: {len(index.missing_classes)} class(es) the source names have no images in "
                      f"this split: {shown}")
    return index


def _write_manifest(stage: Stage, names: list[str], index: ShardIndex, classes: ClassTable, result: ShardCounts,
                    reporter: Reporter) -> StageResult:
    out, split = stage.out, stage.params["split"]
    records = [ShardUnit.from_json(r) for r in stage.records(names).values()]
    manifest = build_manifest(split, records, classes, index, stage.params)

    def write_products() -> None:
        write_json(out / MANIFEST, manifest.to_json())
        write_timm_info(out)

    finished = stage.finalize(write_products, samples=manifest.samples, shards=len(names))
    result.written, result.skipped, result.repaired = manifest.samples, len(manifest.skipped), len(manifest.repaired)
    reporter.info(f"shard {split}: {result.written} written, {result.repaired} repaired, {result.skipped} skipped, "
                  f"{len(manifest.ignored_members)} ignored in {len(manifest.shards)} shards → {out}")
    return StageResult(stage.name, out, finished=finished, product=result)


@dataclass(frozen=True)
class _IndexJob:
    """The first unit: list the source once and fix the assignment (one member list per shard)."""

    source: str
    out: str
    split: str
    labels: str | None
    shard_size: int
    seed: int
    max_classes: int | None = None
    per_class: int | None = None

    def __call__(self, unit: str) -> ShardIndex:
        listing = list_source(Path(self.source), self.split, Path(self.labels) if self.labels else None)
        if not listing.members:
            raise PipeError(f"{self.source}: no {self.split} images found")
        members, classes = listing.members, listing.classes()
        if self.max_classes or self.per_class:
            members = cap_members(members, classes, self.max_classes, self.per_class, self.seed)
            if not members:
                raise PipeError(f"{self.source}: the first {self.max_classes} classes of its list hold no "
                                f"{self.split} images ({', '.join(classes[:self.max_classes][:5])}…)")
        present = {m.wnid for m in members}
        missing = [w for w in (classes[:self.max_classes] if self.max_classes else classes) if w not in present]
        shards = assign_shards(members, self.shard_size, self.seed)
        for i, shard in enumerate(shards):
            write_member_list(Path(self.out) / LISTS / f"{shard_name(self.split, i)}.jsonl", shard)
        return ShardIndex(str(listing.root), len(shards), tuple(len(s) for s in shards), len(members),
                          tuple(sorted(present)), tuple(listing.ignored), tuple(listing.skipped),
                          len(listing.members), tuple(missing) or None)
