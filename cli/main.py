"""The `alexnet-pipe` command line: one thin function per DAG stage. Heavy imports (torch, DALI) happen inside the
commands, so `--help` and up-to-date stages return in well under a second.

Exit codes: 0 success, 1 unexpected error (a bug: rerun with --debug for the traceback), 2 bad usage or input,
3 the stage is already running in that folder, 4 verification found mismatches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="alexnet-pipe",
    help="Reproduce AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) stage by stage: synth → shard → pca-stats "
    "→ train → eval. Every stage is cached (a finished stage returns at once) and restartable (a killed stage "
    "resumes where it stopped).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_debug = False


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False):
    global _debug
    _debug = debug


def _reporter():
    from cli.report import CliReporter

    return CliReporter()


Workers = Annotated[int | None, typer.Option("--workers", "-j", help="Worker processes (default: all cores). "
                                            "Not part of the cache key.", min=1)]
TaskIndex = Annotated[int | None, typer.Option(help="Array task index (default: $SLURM_ARRAY_TASK_ID). This task "
                                              "writes only units [⌊iU/T⌋, ⌊(i+1)U/T⌋).")]
NumTasks = Annotated[int | None, typer.Option(help="Number of array tasks T; required with --task-index.", min=1)]
Force = Annotated[bool, typer.Option("--force", help="Redo the stage even if it is up to date.")]
Seed = Annotated[int, typer.Option(help="Seed: the same seed gives byte-identical outputs.")]


def _task_flags(task_index: int | None, num_tasks: int | None) -> tuple[int | None, int | None]:
    """--task-index defaults to $SLURM_ARRAY_TASK_ID; checked before any work starts."""
    from stages import task_slice

    if task_index is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        task_index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    task_slice(0, task_index, num_tasks)
    return task_index, num_tasks


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to create the data set in.")],
    classes: Annotated[int, typer.Option(help="Number of classes: the first N ILSVRC-2012 wnids.", min=1,
                                         max=1000)] = 10,
    train_per_class: Annotated[int, typer.Option(help="Training images per class.", min=1)] = 100,
    val_per_class: Annotated[int, typer.Option(help="Validation images per class.", min=1)] = 20,
    format: Annotated[str, typer.Option("--format", help="tree: train/<wnid>/*.JPEG + flat val/ + "
                                        "LOC_val_solution.csv; tars: the three official ILSVRC-2012 archives.")
                      ] = "tree",
    seed: Seed = 0,
    force: Force = False,
):
    """Generate the embedded default data set: an ImageNet look-alike with real ILSVRC conventions (wnids, file
    names, val labels, one grayscale, one CMYK and one PNG-named-.JPEG file per split)."""
    from stages import synth as stage

    stage.run(out, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class, fmt=format,
              seed=seed, force=force, reporter=_reporter())


@app.command()
def shard(
    source: Annotated[Path, typer.Argument(help="ImageNet: a folder with the official tars, an extracted tree "
                                           "(train/<wnid>/, val/), or a single split folder or archive.")],
    out: Annotated[Path, typer.Argument(help="Folder for this split's shards, .idx files and manifest.json.")],
    split: Annotated[str, typer.Option(help="train or val.")] = ...,
    labels: Annotated[Path | None, typer.Option(help="Val ground truth: LOC_val_solution.csv, the devkit "
                                                "tar.gz or ILSVRC2012_validation_ground_truth.txt (devkit IDs). "
                                                "Found automatically beside the source.")] = None,
    classes: Annotated[Path | None, typer.Option(help="Class list in LOC_synset_mapping.txt format (default: "
                                                 "the 1,000 ILSVRC-2012 wnids, sorted).")] = None,
    shard_size: Annotated[int, typer.Option(help="Samples per shard.", min=1)] = 1000,
    workers: Workers = None,
    task_index: TaskIndex = None,
    num_tasks: NumTasks = None,
    short_side: Annotated[int, typer.Option(help="Resize so the short side is this many pixels.", min=1)] = 256,
    quality: Annotated[int, typer.Option(help="JPEG quality of the shard images.", min=1, max=100)] = 95,
    seed: Seed = 0,
    force: Force = False,
):
    """Shard one ImageNet split into WebDataset tars (short side 256, RGB baseline JPEG, global sorted-wnid
    labels), with a DALI .idx per shard and manifest.json. Bad images are skipped and listed, never fatal."""
    from stages import shard as stage

    task_index, num_tasks = _task_flags(task_index, num_tasks)
    stage.run(source, out, split=split, labels=labels, classes_file=classes, shard_size=shard_size,
              workers=workers, task_index=task_index, num_tasks=num_tasks, short_side=short_side,
              quality=quality, seed=seed, force=force, reporter=_reporter())


@app.command("pca-stats")
def pca_stats(
    shard_dir: Annotated[Path, typer.Argument(help="The training shard folder (holding manifest.json).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for pca.json and its per-shard partials.")],
    max_images: Annotated[int | None, typer.Option(help="Use a seeded subsample of this many images (a quick "
                                                   "estimate); default: every pixel of every image.", min=1)] = None,
    seed: Seed = 0,
    workers: Workers = None,
    task_index: TaskIndex = None,
    num_tasks: NumTasks = None,
    force: Force = False,
):
    """Exact RGB PCA over every training pixel, in [0,1] units (paper §4.1): writes pca.json with mean, std, cov,
    eigenvalues (descending) and eigenvectors (columns), used for the colour "lighting" augmentation."""
    from stages import pca as stage

    task_index, num_tasks = _task_flags(task_index, num_tasks)
    stage.run(shard_dir, out_dir, max_images=max_images, seed=seed, workers=workers,
              task_index=task_index, num_tasks=num_tasks, force=force, reporter=_reporter())


@app.command()
def train(
    train: Annotated[Path, typer.Option("--train", help="Training shard folder.")] = ...,
    val: Annotated[Path, typer.Option("--val", help="Validation shard folder (per-epoch centre-crop error).")] = ...,
    pca: Annotated[Path, typer.Option("--pca", help="pca.json from `alexnet-pipe pca-stats`.")] = ...,
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints/, metrics.jsonl.")] = ...,
    devices: Annotated[str, typer.Option(help="auto (local rank r gets GPUs 2r and 2r+1, else one GPU, else the "
                                         "CPU), or e.g. cuda:0,cuda:1 (tower A, tower B), cuda:0, cpu, cpu,cpu.")
                       ] = "auto",
    epochs: Annotated[int, typer.Option(help="Epochs (paper: 90).", min=1)] = 90,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.", min=1)] = None,
    batch_size: Annotated[int, typer.Option(help="GLOBAL batch, split evenly over ranks (paper: 128).", min=1)
                          ] = 128,
    lr: Annotated[float, typer.Option(help="Initial learning rate (paper: 0.01).")] = 0.01,
    momentum: Annotated[float, typer.Option(help="SGD momentum (paper: 0.9).")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (paper: 5e-4).")] = 5e-4,
    lr_drops: Annotated[int, typer.Option(help="At most this many lr/10 drops on a val-error plateau (paper: 3).")
                        ] = 3,
    lr_patience: Annotated[int, typer.Option(help="Epochs without val improvement before a drop.")] = 1,
    seed: Seed = 0,
    width: Annotated[float, typer.Option(help="Channel multiplier (demo only; the paper is 1).")] = 1.0,
    crop: Annotated[int, typer.Option(help="224 (conv1 padding 2, torchvision) or 227 (padding 0, Caffe).")] = 224,
    dropout: Annotated[float, typer.Option(help="Dropout in fc6/fc7 (paper: 0.5).")] = 0.5,
    lrn: Annotated[str, typer.Option(help="paper: alpha=1e-4 as printed; caffe: alpha/n as in Caffe/PyTorch.")
                   ] = "paper",
    init: Annotated[str, typer.Option(help="paper: weights N(0, 0.01), biases 0/1 (§5); default: PyTorch's "
                                      "Kaiming-uniform (the demo's narrow net learns only with this).")] = "paper",
    amp: Annotated[bool, typer.Option(help="bf16 autocast.")] = False,
    channels_last: Annotated[bool, typer.Option(help="channels-last memory format.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    loader: Annotated[str, typer.Option(help="dali, or torch (the reference DataLoader path).")] = "dali",
    loader_threads: Annotated[int, typer.Option(help="Loader threads/workers per rank.", min=1)] = 2,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (and at each epoch end).", min=1)
                                ] = 500,
    keep_checkpoints: Annotated[int, typer.Option(help="Keep the last K checkpoints.", min=1)] = 3,
    log_every: Annotated[int, typer.Option(help="Log to metrics.jsonl every N steps.", min=1)] = 10,
    force: Annotated[bool, typer.Option("--force", help="Start over: delete this run's checkpoints.")] = False,
):
    """Train the paper's two-tower AlexNet (SGD, momentum, weight decay, lr/10 on plateaus). Rerun the same command to
    resume from the highest checkpoint. Distributed: torchrun --no-python --nproc_per_node=K alexnet-pipe train …"""
    from pipeline.config import TrainConfig
    from stages import train as stage

    if loader not in ("dali", "torch"):
        raise typer.BadParameter("--loader must be dali or torch")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                      lr_drops=lr_drops, lr_patience=lr_patience, max_steps=max_steps, seed=seed, amp=amp,
                      channels_last=channels_last, compile=compile, loader=loader, loader_threads=loader_threads,
                      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, log_every=log_every)
    stage.run(train, val, pca, out, cfg=cfg, model=stage.ModelOptions(width, crop, dropout, lrn, init), devices=devices,
              force=force, reporter=_reporter())


@app.command("eval")
def eval_(
    run_or_checkpoint: Annotated[Path, typer.Argument(help="A run folder (its highest-step checkpoint) or a "
                                                      "checkpoint file.")],
    val: Annotated[Path, typer.Option("--val", help="Validation shard folder.")] = ...,
    out: Annotated[Path, typer.Option("--out", help="Folder for eval.json.")] = ...,
    ten_crop: Annotated[bool, typer.Option(help="Also the paper's 10-crop test (4 corners + centre of the 256 "
                                           "square and their mirrors, softmax averaged).")] = True,
    devices: Annotated[str, typer.Option(help="Same device map as train: auto, cuda:0,cuda:1, cpu, …")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch (does not change the result).", min=1)] = 64,
    loader: Annotated[str, typer.Option(help="dali, or torch (the reference path).")] = "dali",
    force: Force = False,
):
    """Top-1/top-5 error of a checkpoint on every val image: centre crop and 10-crop, per-class accuracy, the most
    confused class pairs, images/s → eval.json. The model settings come from the checkpoint."""
    from stages import evaluate as stage

    stage.run(run_or_checkpoint, val, out, ten_crop=ten_crop, devices=devices, batch_size=batch_size, loader=loader,
              force=force, reporter=_reporter())


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="The run folder (metrics.jsonl).")],
    eval_dir: Annotated[Path, typer.Option("--eval", help="The eval folder (eval.json).")] = ...,
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md and its PNGs.")] = ...,
    force: Annotated[bool, typer.Option("--force", help="Write it again even when up to date.")] = False,
):
    """Write report.md with loss / lr / val-error / images/s plots, this run beside the paper and torchvision's
    AlexNet (each row labelled with its protocol), per-class accuracy and a grid of val predictions."""
    from stages import report as stage

    stage.run(run_dir, eval_dir, out, force=force, reporter=_reporter())


@app.command()
def preview(
    shard_dir: Annotated[Path, typer.Argument(help="Training shard folder.")],
    pca: Annotated[Path, typer.Option("--pca", help="pca.json from `alexnet-pipe pca-stats`.")] = ...,
    out: Annotated[Path, typer.Option("--out", help="The PNG to write.")] = Path("preview.png"),
    n: Annotated[int, typer.Option("--n", help="Samples in the grid.", min=1)] = 16,
    seed: Seed = 0,
    crop: Annotated[int, typer.Option(help="224 or 227.")] = 224,
    loader: Annotated[str, typer.Option(help="dali, or torch (the reference path).")] = "dali",
):
    """A PNG grid of the first training samples as the network sees them (random crop, mirror, PCA lighting) beside
    their originals with the crop box drawn: check the augmentation by eye."""
    from pipeline.errors import PipeError
    from pipeline.preview import preview_grid

    if crop not in (224, 227):
        raise PipeError(f"--crop must be 224 or 227, got {crop}")
    for path, what in ((shard_dir / "manifest.json", "a shard folder (manifest.json)"), (pca, "pca.json")):
        if not path.is_file():
            raise PipeError(f"{path}: not found; expected {what} from `make prepare`")
    _reporter().info(f"preview: {preview_grid(shard_dir, pca, out, n, seed, crop=crop, loader=loader)}")


@app.command()
def verify(
    shard_dir: Annotated[Path, typer.Argument(help="A shard folder (holding manifest.json).")],
    decode: Annotated[bool, typer.Option(help="Also decode every image.")] = False,
):
    """Re-read every shard and check its sha256 and sample count against the manifest (exit 4 on a mismatch)."""
    from pipeline.errors import VerifyFailed
    from pipeline.shards import load_manifest, verify_shards

    reporter = _reporter()
    total = len(load_manifest(shard_dir)["shards"])
    with reporter.progress("verify", total=total) as advance:
        problems = verify_shards(shard_dir, decode=decode, on_shard=lambda _: advance(1))
    for p in problems:
        reporter.warn(p)
    if problems:
        raise VerifyFailed(f"{shard_dir}: {len(problems)} problem(s) in {total} shards")
    reporter.info(f"verify: {total} shards match the manifest{' and decode' if decode else ''}")


@app.command()
def status(work: Annotated[Path, typer.Argument(help="The work folder (default ./work).")] = Path("work")):
    """One row per DAG stage: done, stale (and why), partial (k of n units) or missing."""
    from rich.console import Console
    from rich.table import Table

    from stages.status import stage_rows

    table = Table(title=f"alexnet-pipe status: {work}")
    for col in ("stage", "folder", "state", "detail"):
        table.add_column(col)
    colours = {"done": "green", "stale": "yellow", "partial": "cyan", "missing": "red"}
    for name, folder, state in stage_rows(work):
        table.add_row(name, str(folder), f"[{colours[state.state]}]{state.state}[/]", state.detail)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    _print_runs(console, work)


def _print_runs(console, work: Path) -> None:
    """The training runs' progress: step/epoch reached, last val error, rate and time left while running."""
    from rich import box
    from rich.table import Table

    from stages.status import run_progress

    rows = run_progress(work)
    if not rows:
        return
    table = Table(title="runs", box=box.SIMPLE_HEAD)  # no │: scripts that read the stage table's rows still can
    for col in ("run", "state", "step", "epoch", "val top-1 error", "rate", "time left"):
        table.add_column(col)
    for r in rows:
        step = f"{r['step']}/{r['total_steps']}" if r["total_steps"] else str(r["step"])
        error = f"{r['val_top1_error']:.4f}" if r["val_top1_error"] is not None else "—"
        rate = f"{r['steps_per_s']:g} steps/s, {r['images_per_s']:g} img/s" if r["steps_per_s"] else "—"
        left = (f"{r['eta_s'] // 3600}h{r['eta_s'] % 3600 // 60:02d}m{r['eta_s'] % 60:02d}s"
                if r["eta_s"] is not None else "—")
        table.add_row(r["run"], r["state"], step, str(r["epoch"]), error, rate, left)
    console.print(table)


@app.command()
def predict(
    run_or_checkpoint: Annotated[Path, typer.Argument(help="A run folder (its highest-step checkpoint) or a "
                                                      "checkpoint file.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (any format the shard stage reads: JPEG, PNG, "
                                                 "CMYK, grayscale, a PNG named .JPEG) or folders of them.")],
    top: Annotated[int, typer.Option(help="How many classes to show per image.", min=1)] = 5,
    ten_crop: Annotated[bool, typer.Option(help="Average the softmax over the paper's 10 crops (4 corners + "
                                           "centre of the 256 square and their mirrors) instead of the centre "
                                           "crop.")] = False,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout (unreadable "
                                             "files too, with their error).")] = False,
    devices: Annotated[str, typer.Option(help="Same device map as train: auto, cuda:0,cuda:1, cpu, …")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch (does not change the result).", min=1)] = 32,
):
    """Classify your own images with a checkpoint: the paper's test preprocessing (short side 256, centre 224 or
    10-crop, minus the checkpoint's mean) → top-k wnid, name, probability. A file that cannot be read is one line
    and the others go on; exit 0 when at least one image was classified, 2 when none."""
    import json

    from pipeline.errors import PipeError
    from pipeline.predict import classify, load_classifier
    from stages.evaluate import resolve_checkpoint

    reporter = _reporter()
    classifier = load_classifier(resolve_checkpoint(run_or_checkpoint), devices)
    classified = failed = 0
    for record in classify(classifier, images, top=top, ten_crop=ten_crop, batch_size=batch_size):
        if "error" in record:
            failed += 1
            reporter.warn(f"{record['path']}: not classified: {record['error']}")
        else:
            classified += 1
        if json_lines:
            print(json.dumps(record), flush=True)
        elif "top" in record:
            print(record["path"])
            for rank, c in enumerate(record["top"], 1):
                print(f"  {rank}. {c['probability']:.4f}  {c['wnid']}  {c['name']}")
    if not classified:
        raise PipeError(f"predict: expected at least one readable image, found none among {failed} path(s)")
    reporter.info(f"predict: {classified} image(s) classified{f', {failed} not' if failed else ''} "
                  f"({'10-crop' if ten_crop else 'centre crop'}, step {classifier.step})")


@app.command()
def export(
    run_or_checkpoint: Annotated[Path, typer.Argument(help="A run folder (its highest-step checkpoint) or a "
                                                      "checkpoint file.")],
    out: Annotated[Path, typer.Option("--out", help="The file to write (.pt2 or .onnx).")] = ...,
    format: Annotated[str | None, typer.Option("--format", help="pt2 (torch.export, always available) or onnx "
                                               "(needs the export extra). Default: from --out's suffix.")
                      ] = None,
):
    """Export a checkpoint's network for other runtimes, with a dynamic batch dimension: torch.export (.pt2) or ONNX.
    The preprocessing it expects (short side, crop, mean, class list) is stored in the file as preprocessing.json."""
    from pipeline.cache import sha256_file
    from pipeline.export import export as export_file
    from pipeline.export import export_format
    from pipeline.predict import load_classifier
    from stages.evaluate import resolve_checkpoint

    checkpoint = resolve_checkpoint(run_or_checkpoint)
    fmt = export_format(out, format)
    classifier = load_classifier(checkpoint, "cpu")
    export_file(classifier, out, fmt, sha256_file(checkpoint))
    _reporter().info(f"export: {checkpoint} (step {classifier.step}) → {out} ({fmt}, dynamic batch)")


def main() -> None:
    """Console-script entry: user errors are one line and a documented exit code, never a traceback."""
    from pipeline.errors import PipeError

    try:
        app()  # typer handles usage errors (exit 2), --help and Ctrl-C (exit 130) itself
    except PipeError as e:
        if _debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if _debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
