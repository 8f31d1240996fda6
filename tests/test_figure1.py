"""Figure 1 on CIFAR-10: the data layouts read alike, the two nets differ only in the neuron, the protocol and the
factor's bound rule on constructed runs, and a tiny sweep through the real CLI (outputs, a rerun that does nothing, a
SIGKILLed sweep that resumes at its last finished epoch, a wrong folder).

The pixels are real CIFAR-10 images (the shared JPEG copy), 40 a class, written by the tests in the official python
batch format and as lossless PNG folders."""

from __future__ import annotations

import json
import os
import pickle
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import event_scalars, shared_data

from pipeline.experiments.figure1 import factor_words, next_run, summarize
from pipeline.experiments.figure1_net import Run, Setup, four_layer_net
from pipeline.records import Factor, Figure1Run
from pipeline.sources.cifar import CLASSES, balanced_subset, find_source, read_training_split

PER_CLASS = 40
# 200 images: 3 epochs of 10 steps a run, long enough for a run in flight to be killed
SWEEP = ["--train-images", "200", "--batch-size", "20", "--epochs", "3", "--lrs", "0.003,0.01", "--seeds", "2",
         "--threshold", "0.7", "--devices", "cpu,cpu"]


@pytest.fixture(scope="module")
def pixels() -> tuple[np.ndarray, np.ndarray]:
    """Real CIFAR-10 pixels (uint8 N×3×32×32) and labels in a shuffled order, as the official batches hold them."""
    from PIL import Image

    jpeg = shared_data("cifar10-jpeg") / "train"
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((jpeg / name).iterdir())[:PER_CLASS]:
            images.append(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1))
            labels.append(label)
    order = np.random.default_rng(0).permutation(len(labels))
    return np.stack(images)[order], np.array(labels)[order]


@pytest.fixture(scope="module")
def layouts(pixels, tmp_path_factory) -> dict[str, Path]:
    """The same pixels as the official archive, its extracted batches folder, and train/<class>/*.png."""
    images, labels = pixels
    root = tmp_path_factory.mktemp("cifar")
    batches = root / "cifar-10-batches-py"
    batches.mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), 1):
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels[part].tolist(),
                 b"data": images[part].reshape(len(part), -1), b"filenames": [f"{j}.png".encode() for j in part]}
        (batches / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    (batches / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}, protocol=2))
    archive = root / "download" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    from PIL import Image

    folders = root / "png"
    for k, (image, label) in enumerate(zip(images, labels)):  # file names in batch order within each class
        (folders / "train" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folders / "train" / CLASSES[label] / f"{k:04d}.png")
    return {"archive": archive, "batches": batches, "folders": folders, "torchvision-root": archive.parent}


def test_the_archive_the_batches_and_png_folders_of_the_same_pixels_load_to_the_same_arrays(pixels, layouts):
    images, labels = pixels
    order = np.argsort(labels, kind="stable")  # canonical: class by class, each in the source's order
    for name, path in layouts.items():
        split = read_training_split(find_source(path))
        assert split.source.layout == ("archive" if name == "torchvision-root" else name)
        assert np.array_equal(split.labels, labels[order]), name
        assert np.array_equal(split.images(np.arange(len(labels))), images[order]), name
    subset = balanced_subset(labels[order], 55, seed=0)
    assert np.bincount(labels[order][subset]).tolist() == [6] * 5 + [5] * 5
    assert np.array_equal(subset, balanced_subset(labels[order], 55, seed=0))


def test_the_two_nets_differ_only_in_the_neuron():
    from torch import nn

    relu, tanh = four_layer_net("relu", "cuda-convnet", seed=3), four_layer_net("tanh", "cuda-convnet", seed=3)
    count = sum(p.numel() for p in relu.parameters())
    assert count == sum(p.numel() for p in tanh.parameters()) == 89_578
    for a, b in zip(relu.state_dict().items(), tanh.state_dict().items(), strict=True):  # same seed, same weights
        assert a[0] == b[0] and a[1].equal(b[1])
    differ = [(type(a), type(b)) for a, b in zip(relu, tanh, strict=True) if type(a) is not type(b)]
    assert differ == [(nn.ReLU, nn.Tanh)] * 3
    assert not four_layer_net("relu", "cuda-convnet", seed=4)[0].weight.equal(relu[0].weight)


def record(activation: str, lr: float, seed: int, reached_at: int | None, trained: int = 40_000,
           end: str | None = None, lowest: float = 0.3) -> Figure1Run:
    """A finished run as `train_run` records it, 10,000 images an epoch."""
    return Figure1Run(activation, lr, seed, end or ("reached" if reached_at else "cap"), 10_000,
                      reached_at or trained, reached_at, reached_at / 10_000 if reached_at else None, lowest, 1.0)


def test_the_factor_is_measured_only_when_every_chosen_run_reached_the_threshold_else_a_bound():
    setup = Setup(lrs=(0.01,), epochs=4, seeds=2)
    relu = [record("relu", 0.01, 0, 10_000), record("relu", 0.01, 1, 14_000)]
    tanh = [record("tanh", 0.01, 0, 60_000), record("tanh", 0.01, 1, 72_000)]
    f = summarize(relu + tanh, setup).factor
    assert f.kind == "measured" and f.value == pytest.approx(66_000 / 12_000)
    assert [p.factor for p in f.by_seed] == pytest.approx([6.0, 72 / 14])
    assert factor_words(f) == "5.5× (seed by seed: 6.0×, 5.1×)"

    slow = [tanh[0], record("tanh", 0.01, 1, None, trained=40_000)]  # seed 1 never reached it in 40,000 images
    f = summarize(relu + slow, setup).factor
    assert f.kind == "lower_bound" and f.value == pytest.approx(50_000 / 12_000) and not f.by_seed
    assert factor_words(f).startswith("at least 4.2×")
    f = summarize([relu[0], record("relu", 0.01, 1, None)] + tanh, setup).factor
    assert f.kind == "upper_bound" and factor_words(f).startswith("at most")
    f = summarize([record("relu", 0.01, 0, None), record("tanh", 0.01, 0, None)], setup).factor
    assert f == Factor("none", None, ())


def test_the_sweep_starts_at_the_grid_centre_bounds_runs_by_the_best_widens_at_the_edge_then_adds_seeds():
    setup = Setup(lrs=(0.001, 0.003, 0.01), epochs=40, seeds=2)
    runs: list[Figure1Run] = []
    assert next_run("relu", runs, setup) == Run("relu", 0.003, 0)
    runs.append(record("relu", 0.003, 0, 50_000))
    assert next_run("relu", runs, setup) == Run("relu", 0.01, 0, stop_after_images=50_000)
    runs.append(record("relu", 0.01, 0, 30_000))
    assert next_run("relu", runs, setup) == Run("relu", 0.001, 0, stop_after_images=30_000)
    runs.append(record("relu", 0.001, 0, None, trained=30_000, end="behind"))
    # 0.01 is best and the grid's top: one step further (the grid's own ratio, 0.01 / 0.003)
    assert next_run("relu", runs, setup) == Run("relu", 0.0333, 0, stop_after_images=30_000)
    runs.append(record("relu", 0.0333, 0, None, trained=30_000, end="behind"))
    assert next_run("relu", runs, setup) == Run("relu", 0.01, 1)  # 0.01 is inside now: its other seed
    runs.append(record("relu", 0.01, 1, 34_000))
    assert next_run("relu", runs, setup) is None
    assert next_run("tanh", runs, setup) == Run("tanh", 0.003, 0)  # the other activation's own sweep


# ---------------------------------------------------------------------------------------------------------------
# the command


def sweep_args(source: Path, out: Path, *extra) -> list:
    return ["figure1", source, "--out", out, *SWEEP, *extra]


@pytest.fixture(scope="module")
def sweep(layouts, tmp_path_factory, cli) -> Path:
    out = tmp_path_factory.mktemp("figure1") / "figure1"
    cli(*sweep_args(layouts["batches"], out))
    return out


def without_seconds(table: dict) -> dict:
    runs = [{k: v for k, v in r.items() if k != "seconds"} | {"epochs": [{k: v for k, v in e.items()
                                                                          if k != "seconds"} for e in r["epochs"]]}
            for r in table["runs"]]
    return {**table, "runs": runs, "description": None}


@pytest.mark.slow
def test_a_tiny_sweep_writes_the_figure_its_data_and_its_table_and_a_rerun_does_nothing(sweep, layouts, cli):
    table = json.loads((sweep / "figure1.json").read_text())
    assert {"figure1.png", "figure1.json", "figure1.md"} <= {p.name for p in sweep.iterdir()}
    assert not list((sweep / "runs").glob("*.pt"))  # a finished run keeps its record, not its checkpoint
    for activation in ("relu", "tanh"):
        chosen = table["chosen"][activation]
        assert chosen["seeds"] == [0, 1]
        assert {r["lr"] for r in table["runs"] if r["activation"] == activation} >= {0.003, 0.01}
    for run in table["runs"]:
        assert run["images_per_epoch"] == 200 and len(run["parts"]) <= 5 * len(run["epochs"])
        assert all(e["seconds"] > 0 and 0 <= e["training_error"] <= 1 for e in run["epochs"])
        reached = [p["images"] for p in run["parts"] if p["error"] <= 0.7]
        assert run["images_to_threshold"] == (reached[0] if reached else None)
    md = (sweep / "figure1.md").read_text()
    assert "The paper (§3.1, Figure 1): about 6×" in md and "![Figure 1" in md
    # TensorBoard: one run per (activation, lr, seed), each its curve under one tag, so that they overlay
    curves = {r["activation"] + f"-lr{r['lr']:g}-seed{r['seed']}": [(p["images"], pytest.approx(p["error"]))
                                                                      for p in r["parts"]] for r in table["runs"]}
    assert {p.name for p in (sweep / "tb").iterdir()} == set(curves)
    for name, curve in curves.items():
        assert event_scalars(sweep / "tb" / name) == {"figure1/training_error": curve}

    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file()}
    again = cli(*sweep_args(layouts["batches"], sweep))
    assert "figure1: up to date" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_sweep_killed_mid_run_resumes_at_its_last_finished_epoch(sweep, layouts, cli, cli_popen, tmp_path):
    out, log = tmp_path / "figure1", tmp_path / "log"
    proc = cli_popen(*sweep_args(layouts["batches"], out), log=log)
    deadline = time.monotonic() + 120
    while not list((out / "runs").glob("*.pt")):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    in_flight = [p.stem for p in (out / "runs").glob("*.pt")]
    assert in_flight and not (out / "figure1.json").exists()
    assert not any((out / "_units" / f"{u}.json").exists() for u in in_flight)

    resumed = cli(*sweep_args(layouts["batches"], out))
    assert "resuming after epoch" in resumed.stderr, resumed.stderr
    assert without_seconds(json.loads((out / "figure1.json").read_text())) == without_seconds(
        json.loads((sweep / "figure1.json").read_text()))


def test_a_folder_that_is_not_cifar_is_one_line_and_exit_2(cli, sample_dir, tmp_path):
    out = cli("figure1", sample_dir, "--out", tmp_path / "out", check=False)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "expected CIFAR-10" in out.stderr and str(sample_dir) in out.stderr
