"""Shared fixtures: the real ImageNet samples in ../shared/data and shard sets built from them by the real stage;
a tiny generated data set and a short training run made through the real CLI.

The real data lives beside the repository, in ../shared/data (ALEXNET_PIPE_SHARED points elsewhere). Where it is
missing, the tests that need it are skipped with one line saying so, except under CI (CI=true), where a missing
data folder is a failure: CI never skips them silently. No test module reads data when it is imported."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.records import Pca

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ALEXNET_PIPE_SHARED", REPO.parent / "shared"))


def shared_data(name: str) -> Path:
    """../shared/data/NAME, or the test is skipped (failed under CI=true) with the reason."""
    path = SHARED / "data" / name
    if not path.is_dir():
        reason = f"test data not found at {path}: set ALEXNET_PIPE_SHARED to the shared/ folder that holds data/{name}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real ImageNet samples (../shared/data/imagenet-sample)."""
    return shared_data("imagenet-sample")


@pytest.fixture(scope="session")
def meta_dir() -> Path:
    """The official ILSVRC-2012 metadata files (../shared/data/imagenet-meta)."""
    return shared_data("imagenet-meta")


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory, sample_dir, meta_dir) -> Path:
    """The samples as an extracted ImageNet tree with its val labels: train/<wnid>/, val/, LOC_val_solution.csv."""
    root = tmp_path_factory.mktemp("imagenet-tree")
    shutil.copytree(sample_dir / "train", root / "train")
    shutil.copytree(sample_dir / "val", root / "val")
    shutil.copy(meta_dir / "LOC_val_solution.csv", root)
    return root


def one_line_error(out: subprocess.CompletedProcess, *expected: str, code: int = 2, warnings: int = 0) -> str:
    """Exit `code`, no traceback, one `error:` line (the last) holding every `expected` text, `warnings` warnings."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == code and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], out.stderr
    assert sum(line.startswith("warning: ") for line in lines) == warnings, out.stderr
    assert all(e in lines[-1] for e in expected), lines[-1]
    return lines[-1]


def shard_set(out: Path) -> dict[str, bytes]:
    """The files a shard folder promises to reproduce byte for byte: tars, DALI indexes and the manifest."""
    files = sorted([*out.glob("*.tar"), *out.glob("*.idx"), out / "manifest.json"])
    return {f.name: f.read_bytes() for f in files}


def samples(out: Path) -> dict[str, dict]:
    """key → {cls, json, jpg, shard} over every shard, read with tarfile; asserts no key appears twice."""
    found: dict[str, dict] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                sample = found.setdefault(key, {"shard": tar_path.name})
                assert sample["shard"] == tar_path.name, f"{key} is in two shards"
                assert ext not in sample, f"{key}.{ext} written twice"
                member = tar.extractfile(m)
                assert member is not None, f"{key}.{ext} is not a regular file"
                sample[ext] = member.read()
    return found


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, sample_tree) -> dict[str, Path]:
    """Train (210 images, shards of 64) and val (50 images, shards of 16) shard folders from the real samples."""
    from stages import shard

    out = tmp_path_factory.mktemp("shards")
    shard.run(sample_tree, out / "train", split="train", shard_size=64, workers=2)
    shard.run(sample_tree, out / "val", split="val", shard_size=16, workers=2)
    return {"train": out / "train", "val": out / "val"}


SMALL_SIZE = (128, 112)  # a second image size (short side, crop): every size-dependent path is tested at it too


@pytest.fixture(scope="session")
def small_sample_shards(tmp_path_factory, sample_tree) -> dict[str, Path]:
    """The real samples' shards at short side 128, as `sample_shards` (the crop that fits: 112)."""
    from stages import shard

    out = tmp_path_factory.mktemp("shards-128")
    for split, size in (("train", 64), ("val", 16)):
        shard.run(sample_tree, out / split, split=split, shard_size=size, workers=2, short_side=SMALL_SIZE[0])
    return {"train": out / "train", "val": out / "val"}


# ---------------------------------------------------------------------------------------------------------------
# a tiny generated data set and a short training run, made through the real CLI (train / eval / report / e2e tests)

CLI = str(Path(sys.executable).with_name("alexnet-pipe"))
# Two torch threads everywhere: the same count in every run keeps CPU training bit-reproducible, and the machine may
# have only two cores.
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
TINY_DATA = {"classes": 6, "train_per_class": 6, "val_per_class": 3}  # 36 train, 18 val images
# 9 steps an epoch (batch 4), a checkpoint every 3 steps: 3, 6, 9 (epoch end), 12, 15, 18 (epoch end)
TINY_TRAIN = {"width": "0.125", "init": "default", "lr": "0.003", "epochs": "2", "batch-size": "4", "seed": "0",
              "devices": "cpu", "checkpoint-every": "3", "log-every": "1", "keep-checkpoints": "3"}


def run_cli(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`alexnet-pipe ARGS` in a subprocess; with `check`, a failure shows its stderr."""
    out = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=CLI_ENV)
    if check and out.returncode != 0:
        raise AssertionError(f"alexnet-pipe {' '.join(map(str, args))} → exit {out.returncode}\n{out.stderr}")
    return out


def run_cli_here(*args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`alexnet-pipe ARGS` through its own entry point inside this process: the same stdout, stderr and exit code,
    without an interpreter start (~0.6 s). For tests of arguments, messages and exit codes; anything that trains,
    forks or takes signals runs as a real process (`run_cli`)."""
    from cli.main import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = os.environ.copy(), sys.argv
    os.environ.update(env or {})
    sys.argv = ["alexnet-pipe", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        sys.argv = saved[1]
    if check and code != 0:
        raise AssertionError(f"alexnet-pipe {' '.join(map(str, args))} → exit {code}\n{err.getvalue()}")
    return subprocess.CompletedProcess(["alexnet-pipe", *map(str, args)], code, out.getvalue(), err.getvalue())


def popen_cli(*args, log: Path) -> subprocess.Popen:
    """`alexnet-pipe ARGS` started in its own process group (so a test can SIGKILL it whole), output to `log`, with
    Ctrl-C's default disposition as from a terminal (a suite started in the background has SIGINT ignored, which
    its children would inherit)."""
    with open(log, "w") as f:
        return subprocess.Popen([CLI, *map(str, args)], stdout=f, stderr=subprocess.STDOUT, env=CLI_ENV,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                           signal.SIG_DFL))


def train_args(data: dict[str, Path], out: Path, **overrides) -> list[str]:
    """The CLI arguments of the tiny training run; `overrides` use the option names (`lr=0.01`, `force=True`)."""
    options = {**TINY_TRAIN, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    args = ["train", "--train", data["train"], "--val", data["val"], "--pca", data["pca"], "--out", out]
    for name, value in options.items():
        if value is True:
            args.append(f"--{name}")
        elif value is not None and value is not False:
            args += [f"--{name}", str(value)]
    return [str(a) for a in args]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """synth → shard train (shards of 8) → shard val (shards of 8) → pca-stats, each by its CLI command."""
    work = tmp_path_factory.mktemp("tiny-work")
    run_cli_here("synth", work / "demo-data", "--classes", TINY_DATA["classes"], "--train-per-class",
            TINY_DATA["train_per_class"], "--val-per-class", TINY_DATA["val_per_class"], "--seed", 0)
    for split in ("train", "val"):
        run_cli_here("shard", work / "demo-data", work / "shards" / split, "--split", split, "--shard-size", 8)
    run_cli_here("pca-stats", work / "shards" / "train", work / "pca")
    return {"work": work, "train": work / "shards" / "train", "val": work / "shards" / "val",
            "pca": work / "pca" / "pca.json"}


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run of the tiny net (18 steps); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    run_cli(*train_args(tiny_data, out))
    return out


@pytest.fixture(scope="session")
def levelled_checkpoint(tiny_run, tiny_data, tmp_path_factory) -> Path:
    """The short run's last checkpoint with the fc8 biases of the val classes moved so that each one's mean val
    logit is the mean top logit of the classes absent from val.

    After 18 steps the net ranks its favourite class first for every image, so top-1 could not tell a right
    evaluation (or report) from a wrong one; so levelled, its top-1 and top-5 vary from image to image and the
    10-crop errors differ from the centre crop's. Everything else is the run's checkpoint as written. It lies in a
    copy of the run (with its digest beside it), so that the copy's report may quote its eval."""
    import torch

    from pipeline.augment import reference_eval_samples
    from pipeline.model import build_model
    from pipeline.records import RunSpec

    original = sorted((tiny_run / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(original, map_location="cpu", weights_only=True)
    net = build_model(RunSpec.of_checkpoint(state).model, ["cpu"])
    net.load_state_dict(state["model"])
    samples = list(reference_eval_samples(tiny_data["val"], Pca.read(tiny_data["pca"]), crop=224))
    classes = sorted({label for _, _, label in samples})
    with torch.no_grad():
        logits = net.eval()(torch.stack([image for _, image, _ in samples]))
    absent = torch.ones(logits.shape[1], dtype=torch.bool)
    absent[classes] = False
    level = logits[:, absent].max(dim=1).values.mean()  # the best class absent from val, on average
    state["model"]["fc8.bias"][classes] += level - logits[:, classes].mean(dim=0)
    run = tmp_path_factory.mktemp("levelled") / "run"
    shutil.copytree(tiny_run, run)
    path = run / "checkpoints" / original.name
    torch.save(state, path)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    return path


@pytest.fixture(scope="session")
def cli():
    """`cli(*args, check=True)`: run `alexnet-pipe` in a subprocess (two torch threads)."""
    return run_cli


@pytest.fixture(scope="session")
def cli_here():
    """`cli_here(*args, check=True, env=None)`: run `alexnet-pipe` inside this process (arguments, messages, exit
    codes)."""
    return run_cli_here


@pytest.fixture(scope="session")
def cli_popen():
    """`cli_popen(*args, log=PATH)`: start `alexnet-pipe` in its own process group, not waiting for it."""
    return popen_cli


@pytest.fixture(scope="session")
def train_cmd():
    """`train_cmd(data, out, **overrides)`: the tiny run's `train` arguments, options overridden by name."""
    return train_args


@pytest.fixture
def one_thread():
    """Per-image tensors are tiny: with several intra-op threads on a busy machine they only wait on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1 MiB at tmp_path/disk (root only); `grow()` makes it 64 MiB. Always unmounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({mounted.stderr.strip() or 'mount failed'})")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)

    try:
        yield disk, grow
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard events folder as TensorBoard's own reader gives it: tag → [(step, value)],
    stale steps purged as TensorBoard purges them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def hparams_sessions(folder: Path) -> dict[str, tuple[dict, dict[str, float]]]:
    """The HParams plugin's sessions under `folder`: session name → (hparams, {metric tag: value})."""
    from google.protobuf.json_format import MessageToDict
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        hparams = {k: MessageToDict(v) for k, v in start.hparams.items()}  # a protobuf Value: its Python value
        sessions[run.name] = (hparams, {t: events.Scalars(t)[-1].value for t in events.Tags()["scalars"]})
    return sessions
