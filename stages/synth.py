"""Stage `synth`: the embedded default data set (pipeline/synth/), generated into a temp folder and moved into
place whole, then marked done; so a killed run leaves nothing that looks finished and a rerun is up to date."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.engine import QuietReporter, Reporter, Stage, StageResult, disk_full_is_user_error

VERSION = 1
# The digest of this stage's output at VERSION (tests/test_golden.py): output that changes needs a bump.
GOLDEN = {"version": 1,
          "demo": "c8267ca1c7b974702bbfb1aeacd59d13e2b785c8515332d3d9e3be5c39f2cc98"}
PRODUCTS = ("train", "val", "LOC_val_solution.csv", "LOC_synset_mapping.txt", "ILSVRC2012_img_train.tar",
            "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")


def run(out: Path, *, classes: int = 10, train_per_class: int = 100, val_per_class: int = 20, fmt: str = "tree",
        seed: int = 0, force: bool = False, reporter: Reporter | None = None) -> StageResult:
    """The product is the generator's summary (image counts, the quirk files)."""
    reporter = reporter or QuietReporter()
    params = {"classes": classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "format": fmt, "seed": seed}
    stage = Stage("synth", VERSION, out, params)
    return stage.execute(lambda: _generate(stage, classes, train_per_class, val_per_class, fmt, seed, reporter),
                         say=reporter, force=force, units=["generate"])


def _generate(stage: Stage, classes: int, train_per_class: int, val_per_class: int, fmt: str, seed: int,
              reporter: Reporter) -> StageResult:
    """Generate into a temp folder, then move it into place and mark the stage done."""
    from pipeline import synth

    out = stage.out
    for leftover in [*out.glob(".synth-tmp-*"), *(out / p for p in PRODUCTS)]:
        _remove(leftover)
    tmp = out / f".synth-tmp-{os.getpid()}"
    tmp.mkdir()
    total = synth.synth_image_count(classes, train_per_class, val_per_class)
    try:
        with reporter.progress("synth", total=total) as advance, disk_full_is_user_error(tmp):
            summary = synth.generate(tmp, classes=classes, train_per_class=train_per_class,
                                     val_per_class=val_per_class, seed=seed, fmt=fmt, progress=advance)
    except BaseException:  # a full disk or Ctrl-C: free what was written (a SIGKILL's leftover goes next run)
        _remove(tmp)
        raise

    def move_into_place() -> None:
        for entry in sorted(tmp.iterdir()):
            entry.rename(out / entry.name)
        tmp.rmdir()

    finished = stage.finalize(move_into_place, images=total)
    reporter.info(f"synth: {total} images, {classes} classes ({fmt}) → {out}"
                  + (f"; quirk files: {', '.join(summary.quirks)}" if summary.quirks else ""))
    return StageResult(stage.name, out, finished=finished, product=summary)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
