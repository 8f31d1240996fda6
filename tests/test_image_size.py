"""One image size through every stage: shards at short side 72, a run at crop 64 on them, its eval, predict and
export with no size flag (the checkpoint knows its size), and each size that does not fit refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, run_cli, run_cli_here, train_args

from pipeline.augment import ReferenceEvalLoader
from pipeline.augment.loading import ShardSet, sample_index
from pipeline.export import load_preprocessing
from pipeline.predict import image_views, load_classifier

SIDE, CROP = 72, 64


@pytest.fixture(scope="module")
def small(tiny_data, tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """The tiny demo set sharded at short side 72 with its PCA, and a 2-epoch run of the tiny net at crop 64."""
    work = tmp_path_factory.mktemp(f"size-{SIDE}")
    for split in ("train", "val"):
        run_cli_here("shard", tiny_data["work"] / "demo-data", work / "shards" / split, "--split", split,
                     "--shard-size", 8, "--short-side", SIDE)
    run_cli_here("pca-stats", work / "shards" / "train", work / "pca")
    data = {"work": work, "train": work / "shards" / "train", "val": work / "shards" / "val",
            "pca": work / "pca" / "pca.json"}
    run = work / "run"
    run_cli(*train_args(data, run, crop=CROP))
    return data, run


def last_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*.pt"))[-1]


@pytest.mark.slow
def test_a_run_knows_its_size_and_eval_measures_it_there_as_training_did(small, tmp_path):
    data, run = small
    classifier = load_classifier(last_checkpoint(run))
    assert (classifier.spec.model.crop, classifier.spec.short_side) == (CROP, SIDE)
    assert classifier.model.towers[0].fc6.in_features == 2 * classifier.spec.model.channels(128) * 1  # pool5 1x1
    run_cli("eval", run, "--val", data["val"], "--out", tmp_path / "eval", "--loader", "torch")
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_top1_error" in line]
    assert result["samples"] == 18 and result["centre"]["top1_error"] == pytest.approx(epochs[-1]["val_top1_error"])


@pytest.mark.slow
def test_predict_resizes_a_file_to_the_runs_short_side_as_its_shards_were(tiny_data, small, one_thread):
    data, run = small
    classifier = load_classifier(last_checkpoint(run))
    files = {p.stem: p for p in (tiny_data["work"] / "demo-data").glob("val/**/*") if p.is_file()}
    keys = list(sample_index(ShardSet.open(data["val"])).keys)
    for ten_crop in (False, True):
        loader = ReferenceEvalLoader(data["val"], classifier.spec.pixels, 8, crop=CROP, ten_crop=ten_crop,
                                     num_threads=0)
        for key, expected in zip(keys, torch.cat([images for images, _ in loader]), strict=True):
            views = image_views(files[key].read_bytes(), classifier.mean, CROP, ten_crop, classifier.spec.short_side)
            assert torch.equal(views, expected), key
    out = run_cli("predict", last_checkpoint(run), files[keys[0]], "--top", 2)
    assert out.returncode == 0 and files[keys[0]].name in out.stdout


@pytest.mark.slow
def test_export_writes_the_runs_size_and_its_program_takes_that_input(small, tmp_path):
    _, run = small
    path = tmp_path / "model.pt2"
    run_cli("export", last_checkpoint(run), "--out", path)
    stored = load_preprocessing(path)
    assert (stored.short_side, stored.crop) == (SIDE, CROP)
    classifier = load_classifier(last_checkpoint(run))
    images = 50 * torch.randn(3, 3, CROP, CROP)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(path).module()(images), classifier.model(images))


def test_shards_and_crops_of_other_sizes_are_refused_in_one_line_before_any_run_is_claimed(tiny_data, small,
                                                                                           tmp_path, cli_here):
    data, run = small
    mixed = {**data, "val": tiny_data["val"]}  # val at 256, train at 72
    line = one_line_error(cli_here(*train_args(mixed, tmp_path / "a", crop=CROP), check=False))
    assert f"expected val shards of the training shards' short side {SIDE}, found 256" in line
    line = one_line_error(cli_here(*train_args(data, tmp_path / "b", crop=80), check=False))
    assert line.startswith("error: --crop: ") and "at most the short side of the training shards" in line
    assert "found 80" in line and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    line = one_line_error(cli_here("eval", run, "--val", tiny_data["val"], "--out", tmp_path / "e", check=False))
    assert f"expected val shards of short side {SIDE} (the run's training shards'), found 256" in line


@pytest.mark.slow
def test_make_prepare_shards_at_the_recipes_short_side_in_folders_of_its_own(tmp_path):
    """A recipe's [shards] short_side is what `make prepare` shards at; the paper's 256 beside it overwrites nothing."""
    import subprocess
    import sys

    from pipeline.records import Manifest

    recipe, work = tmp_path / "small.toml", tmp_path / "work"
    recipe.write_text(f"[model]\ncrop = {CROP}\n\n[shards]\nshort_side = {SIDE}\n")
    venv = Path(sys.executable).parents[1]  # the venv running the tests, wherever the tree is
    make = ["make", "-s", "-o", f"{venv}/.setup-stamp", "prepare", f"VENV={venv}", f"WORK={work}", "DEMO_CLASSES=3",
            "DEMO_TRAIN=4", "DEMO_VAL=2"]
    repo = Path(__file__).parents[1]
    subprocess.run([*make, f"RECIPE={recipe}"], cwd=repo, check=True, capture_output=True, timeout=300)
    small = [work / f"shards-{SIDE}" / split for split in ("train", "val")]
    assert [Manifest.read(folder).params.short_side for folder in small] == [SIDE, SIDE]
    assert (work / f"pca-{SIDE}" / "pca.json").is_file()
    written = {p: p.stat().st_mtime_ns for folder in small for p in folder.iterdir()}
    subprocess.run(make, cwd=repo, check=True, capture_output=True, timeout=300)  # the demo recipe: 256
    assert Manifest.read(work / "shards" / "train").params.short_side == 256 and (work / "pca" / "pca.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in written} == written
