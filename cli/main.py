"""The `alexnet-pipe` command line: one thin function per command, each its arguments, one stage call and what it
shows. Heavy imports (torch, DALI) happen inside the commands, so `--help` and up-to-date stages return in well
under a second.

Exit codes: 0 success, 1 unexpected error (a bug: rerun with --debug for the traceback), 2 bad usage or input,
3 the stage is already running in that folder, 4 verification found mismatches, 5 training diverged.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, cast

import typer

from cli.display import CliReporter, one_line, output_closed, print_prediction, print_status
from cli.experiments import ablate, figure1
from cli.options import (
    RECIPES,
    Commands,
    CutInput,
    Force,
    NumTasks,
    Out,
    PcaJson,
    RunOrCheckpoint,
    Seed,
    TaskIndex,
    TrainShards,
    UntrainedValClasses,
    Workers,
    out_folder,
    task_flags,
    with_settings,
)
from pipeline.config import SHORT_SIDE, SMALLEST_CROP, AlexNetConfig, Loader

app = typer.Typer(
    name="alexnet-pipe",
    cls=Commands,
    help="Reproduce AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) stage by stage: synth → shard → pca-stats "
    "→ train → eval. Every stage is cached (a finished stage returns at once) and restartable (a killed stage "
    "resumes where it stopped).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)

_debug = False


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False):
    global _debug
    _debug = debug


@app.command()
def synth(
    out_arg: Annotated[Path | None, typer.Argument(metavar="OUT", help="Folder to create the data set in (or --out).",
                                                   show_default=False)] = None,
    out: Out = None,
    classes: Annotated[int, typer.Option(help="Number of classes: the first N ILSVRC-2012 wnids.", min=1,
                                         max=1000)] = 10,
    train_per_class: Annotated[int, typer.Option(help="Training images per class.", min=1)] = 100,
    val_per_class: Annotated[int, typer.Option(help="Validation images per class.", min=1)] = 20,
    format: Annotated[str, typer.Option("--format", metavar="tree|tars", help="tree: train/<wnid>/*.JPEG + flat val/ + "
                                        "LOC_val_solution.csv; tars: the three official ILSVRC-2012 archives.")
                      ] = "tree",
    seed: Seed = 0,
    force: Force = False,
):
    """Generate the embedded default data set: an ImageNet look-alike with real ILSVRC conventions (wnids, file
    names, val labels, one grayscale, one CMYK and one PNG-named-.JPEG file per split)."""
    from stages import synth as stage

    stage.run(out_folder(out_arg, out, "the data set"), classes=classes, train_per_class=train_per_class,
              val_per_class=val_per_class, fmt=format,
              seed=seed, force=force, reporter=CliReporter())


@app.command()
def shard(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="ImageNet: a folder with the official tars, an "
                                           "extracted tree (train/<wnid>/, val/), or a single split folder or "
                                           "archive; or Tiny ImageNet: tiny-imagenet-200/ or tiny-imagenet-200.zip "
                                           "as downloaded.")],
    out_arg: Annotated[Path | None, typer.Argument(metavar="OUT", help="Folder for this split's shards, .idx files "
                                                   "and manifest.json (or --out).", show_default=False)] = None,
    out: Out = None,
    # required (typer's `...`; a default only because the optional OUT argument comes first)
    split: Annotated[str, typer.Option(metavar="train|val", help="The split to shard.")] = cast(str, ...),
    labels: Annotated[Path | None, typer.Option(help="Val ground truth: LOC_val_solution.csv, the devkit "
                                                "tar.gz or ILSVRC2012_validation_ground_truth.txt (devkit IDs). "
                                                "Found automatically beside the source.")] = None,
    classes: Annotated[Path | None, typer.Option(help="Class list in LOC_synset_mapping.txt format (default: "
                                                 "the 1,000 ILSVRC-2012 wnids, sorted).")] = None,
    shard_size: Annotated[int, typer.Option(help="Samples per shard.", min=1)] = 1000,
    workers: Workers = None,
    task_index: TaskIndex = None,
    num_tasks: NumTasks = None,
    short_side: Annotated[int, typer.Option(help="Resize so the short side is this many pixels (the paper's 256; "
                                            "a run's --crop must fit in it).", min=1)] = SHORT_SIDE,
    quality: Annotated[int, typer.Option(help="JPEG quality of the shard images.", min=1, max=100)] = 95,
    max_classes: Annotated[int | None, typer.Option(help="Shard only the first N classes (sorted wnids) of the "
                                                    "split; give both splits the same N.", min=1)] = None,
    per_class: Annotated[int | None, typer.Option(help="At most N images a class, a seeded choice (a small "
                                                  "training set, where overfitting shows soonest).", min=1)] = None,
    seed: Seed = 0,
    force: Force = False,
):
    """Shard one ImageNet split into WebDataset tars (short side 256, RGB baseline JPEG, global sorted-wnid
    labels), with a DALI .idx per shard and manifest.json. Bad images are skipped and listed, never fatal."""
    from stages import shard as stage

    task_index, num_tasks = task_flags(task_index, num_tasks)
    stage.run(source, out_folder(out_arg, out, "the shards"), split=split, labels=labels, classes_file=classes,
              shard_size=shard_size, workers=workers, task_index=task_index, num_tasks=num_tasks, short_side=short_side,
              quality=quality, seed=seed, max_classes=max_classes, per_class=per_class, force=force,
              reporter=CliReporter())


@app.command("pca-stats")
def pca_stats(
    shard_dir: Annotated[Path, typer.Argument(metavar="SHARD_DIR", help="The training shard folder (holding "
                                              "manifest.json).")],
    out_arg: Annotated[Path | None, typer.Argument(metavar="OUT", help="Folder for pca.json and its per-shard "
                                                   "partials (or --out).", show_default=False)] = None,
    out: Out = None,
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

    task_index, num_tasks = task_flags(task_index, num_tasks)
    stage.run(shard_dir, out_folder(out_arg, out, "pca.json"), max_images=max_images, seed=seed, workers=workers,
              task_index=task_index, num_tasks=num_tasks, force=force, reporter=CliReporter())


@app.command()
@with_settings
def train(
    train: TrainShards,
    val: Annotated[Path, typer.Option("--val", help="Validation shard folder (per-epoch centre-crop error).")],
    pca: PcaJson,
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints/, metrics.jsonl.")],
    recipe: Annotated[str, typer.Option(metavar=RECIPES, help="The settings to start from: paper (§5: the "
                                        "settings' defaults), demo (the embedded demo's), tiny (Tiny ImageNet on a "
                                        "CPU), claims (Tiny ImageNet at 128/112 px, where §4's overfitting shows), "
                                        "or a TOML file with model and train tables. Every option below "
                                        "overrides the recipe.")] = "paper",
    devices: Annotated[str, typer.Option(help="auto (local rank r gets GPUs 2r and 2r+1, else one GPU, else the "
                                         "CPU), or e.g. cuda:0,cuda:1 (tower A, tower B), cuda:0, cpu, cpu,cpu.")
                       ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Start over: delete this run's checkpoints.")] = False,
    **settings,
):
    """Train the paper's two-tower AlexNet (SGD, momentum, weight decay, lr/10 on plateaus) from a recipe. Rerun the
    same command to resume from the highest checkpoint. Distributed: torchrun --no-python --nproc_per_node=K
    alexnet-pipe train …"""
    from pipeline.config import resolve_settings
    from stages import train as stage

    model, cfg = resolve_settings(recipe, settings)
    stage.run(train, val, pca, out, cfg=cfg, model=model, devices=devices, force=force, reporter=CliReporter())


@app.command("eval")
def eval_(
    run_or_checkpoint: RunOrCheckpoint,
    val: Annotated[Path, typer.Option("--val", help="Validation shard folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for eval.json.")],
    ten_crop: Annotated[bool, typer.Option(help="Also the paper's 10-crop test (4 corners + centre of the 256 "
                                           "square and their mirrors, softmax averaged).")] = True,
    devices: Annotated[str, typer.Option(help="Same device map as train: auto, cuda:0,cuda:1, cpu, …")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch (does not change the result).", min=1)] = 64,
    loader: Annotated[Loader, typer.Option(help="dali, or torch (the reference path).")] = "dali",
    train: Annotated[Path | None, typer.Option("--train", help="The run's own training shards: also the training "
                                               "error measured as val's (eval mode, centre crop, as many images as "
                                               "val: the train–val gap) and Figure 4's six nearest training images "
                                               "(fc7 features) of five val images.")] = None,
    neighbour_train_images: Annotated[int | None, typer.Option(help="Search only the first N training images "
                                                               "(default 10,000; 0: no Figure 4).", min=0)] = None,
    untrained_val_classes: UntrainedValClasses = False,
    force: Force = False,
):
    """Top-1/top-5 error of a checkpoint on every val image: centre crop and 10-crop, per-class accuracy, the most
    confused class pairs, images/s, and the paper's Figure 3 (conv1 kernels, chroma per tower) → eval.json. The
    model settings come from the checkpoint."""
    from stages import evaluate as stage

    stage.run(run_or_checkpoint, val, out, ten_crop=ten_crop, devices=devices, batch_size=batch_size, loader=loader,
              train_dir=train, neighbour_train_images=neighbour_train_images,
              untrained_val_classes=untrained_val_classes, force=force, reporter=CliReporter())


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="The run folder (metrics.jsonl).")],
    eval_dir: Annotated[Path, typer.Option("--eval", help="The eval folder (eval.json).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md and its PNGs.")],
    force: Annotated[bool, typer.Option("--force", help="Write it again even when up to date.")] = False,
):
    """Write report.md with loss / lr / val-error / images/s plots, this run beside the paper and torchvision's
    AlexNet (each row labelled with its protocol), per-class accuracy and a grid of val predictions."""
    from stages import report as stage

    stage.run(run_dir, eval_dir, out, force=force, reporter=CliReporter())


@app.command()
def preview(
    shard_dir: Annotated[Path, typer.Argument(metavar="SHARD_DIR", help="Training shard folder.")],
    pca: Annotated[Path, typer.Option("--pca", help="pca.json from `alexnet-pipe pca-stats`.")],
    out: Annotated[Path, typer.Option("--out", help="The image to write: .png, or .jpg/.jpeg.")] = Path("preview.png"),
    n: Annotated[int, typer.Option("--n", help="Samples in the grid.", min=1)] = 16,
    seed: Seed = 0,
    crop: Annotated[int, typer.Option(help="The patch side: the run's --crop (224; 227 is Caffe's).",
                                      min=SMALLEST_CROP)] = AlexNetConfig.crop,
    loader: Annotated[Loader, typer.Option(help="dali, or torch (the reference path).")] = "dali",
):
    """A PNG grid of the first training samples as the network sees them (random crop, mirror, PCA lighting) beside
    their originals with the crop box drawn: check the augmentation by eye."""
    from stages import preview as stage

    stage.run(shard_dir, pca, out, n=n, seed=seed, crop=crop, loader=loader, reporter=CliReporter())


@app.command()
def verify(
    shard_dir: Annotated[Path, typer.Argument(metavar="SHARD_DIR", help="A shard folder (holding manifest.json).")],
    decode: Annotated[bool, typer.Option(help="Also decode every image.")] = False,
):
    """Re-read every shard and check its sha256 and sample count against the manifest (exit 4 on a mismatch)."""
    from stages import verify as stage

    stage.run(shard_dir, decode=decode, reporter=CliReporter())


@app.command()
def recipe(
    name: Annotated[str, typer.Argument(metavar="RECIPE", help=f"{RECIPES.replace('|', ', ')}.")] = "paper",
    get: Annotated[str | None, typer.Option("--get", metavar="TABLE.KEY", help="Print only this value, e.g. "
                                            "shards.short_side (what `make prepare` shards at) or model.crop.")] = None,
):
    """A recipe as training resolves it: every setting of its [model], [train] and [shards] tables, the values the
    recipe sets marked beside the paper's."""
    from pipeline.config import recipe_lines, recipe_value

    if get is not None:
        value = recipe_value(name, get)
        print(str(value).lower() if isinstance(value, bool) else value)
        return
    print("\n".join(recipe_lines(name)))


@app.command()
def status(work: Annotated[Path, typer.Argument(metavar="WORK", help="The work folder.")] = Path("work")):
    """One row per stage folder under WORK: done, stale (and why), partial (k of n units), damaged (shards missing
    or resized: run verify) or missing; then one row per training run."""
    print_status(work)


@app.command()
def predict(
    run_or_checkpoint: RunOrCheckpoint,
    images: Annotated[list[Path], typer.Argument(metavar="IMAGES", help="Image files (any format the shard stage "
                                                 "reads: JPEG, PNG, CMYK, grayscale, a PNG named .JPEG) or folders of "
                                                 "them.")],
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

    from stages import predict as stage

    stage.run(run_or_checkpoint, images, top=top, ten_crop=ten_crop, devices=devices, batch_size=batch_size,
              on_record=lambda record: print_prediction(record, json_lines), reporter=CliReporter())


@app.command()
def export(
    run_or_checkpoint: RunOrCheckpoint,
    out: Annotated[Path, typer.Option("--out", help="The file to write (.pt2 or .onnx).")],
    format: Annotated[str | None, typer.Option("--format", metavar="pt2|onnx", help="pt2 (torch.export, always "
                                               "available) or onnx (needs the export extra). Default: the one "
                                               "--out's suffix names.")
                      ] = None,
):
    """Export a checkpoint's network for other runtimes, with a dynamic batch dimension: torch.export (.pt2) or ONNX.
    The preprocessing it expects (short side, crop, mean, class list) is stored in the file as preprocessing.json."""
    from stages import export as stage

    stage.run(run_or_checkpoint, out, fmt=format, reporter=CliReporter())


for command in (ablate, figure1):  # the paper's experiments, in cli/experiments.py
    app.command()(command)


def main() -> None:
    """Console-script entry: user errors are one line and a documented exit code, never a traceback."""
    from pipeline.errors import Diverged, Stopped

    try:
        app()  # typer handles usage errors (exit 2), --help and Ctrl-C (exit 130) itself
    except BrokenPipeError:  # the reader went away (`status | head`): nothing more is wanted, nothing went wrong
        output_closed()
        sys.exit(0)
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if _debug and not isinstance(e, Stopped | Diverged):
            raise
        code, line = one_line(e.__cause__ if isinstance(e, CutInput) and e.__cause__ else e)
        if line:
            print(line, file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
