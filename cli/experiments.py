"""The commands of the paper's experiments beside the pipeline: `ablate` (§4's claims, the baseline against one
variant per claim) and `figure1` (§3.1's ReLU against tanh on CIFAR-10). cli/main.py registers them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.display import CliReporter
from cli.options import RECIPES, NumTasks, PcaJson, TaskIndex, TrainShards, numbers, task_flags, with_settings
from pipeline.experiments.claims import VARIANT_NAMES


@with_settings
def ablate(
    train: TrainShards,
    val: Annotated[Path, typer.Option("--val", help="Validation shard folder.")],
    pca: PcaJson,
    out: Annotated[Path, typer.Option("--out", help="Sweep folder: runs/, eval/, ablations.md/.json, plots.")],
    recipe: Annotated[str, typer.Option(metavar=RECIPES, help="The baseline's settings: paper, demo, a shipped "
                                        "recipe by name or a TOML file; the options below override it for every "
                                        "variant.")] = "paper",
    seeds: Annotated[int, typer.Option(help="Seeds per variant (0..N-1).", min=1)] = 3,
    variants: Annotated[str, typer.Option(help="Comma list of variants (baseline included), or all: "
                                          f"{', '.join(VARIANT_NAMES)}.")] = "all",
    threshold: Annotated[float, typer.Option(help="Training top-1 error whose first crossing is counted in "
                                             "epochs (Figure 1; the paper's 25% is for CIFAR-10).")] = 0.5,
    ten_crop: Annotated[bool, typer.Option(help="Evaluate with the paper's 10-crop test (else centre crop).")
                        ] = True,
    devices: Annotated[str, typer.Option(help="As for train; the one-tower variant and eval use its first "
                                         "device.")] = "auto",
    task_index: TaskIndex = None,
    num_tasks: NumTasks = None,
    force: Annotated[bool, typer.Option("--force", help="Start every run of the sweep over.")] = False,
    **settings,
):
    """The paper's claims (ReLU, two towers, LRN, overlapping pools, crops+mirrors, lighting, dropout): train the
    baseline and one variant per claim for N seeds on the same shards, evaluate each, and write ablations.md,
    ablations.json and plots. Each run is cached; a rerun does nothing, a killed sweep resumes."""
    from pipeline.config import resolve_settings
    from stages import ablate as stage
    from stages import evaluate as eval_stage
    from stages import train as train_stage

    task_index, num_tasks = task_flags(task_index, num_tasks)
    model, cfg = resolve_settings(recipe, settings)
    chosen = VARIANT_NAMES if variants == "all" else tuple(v.strip() for v in variants.split(",") if v.strip())
    stage.run(train, val, pca, out, model=model, cfg=cfg, train_stage=train_stage.run, eval_stage=eval_stage.run,
              recipe=recipe, seeds=seeds, variants=chosen,
              threshold=threshold, ten_crop=ten_crop, devices=devices, task_index=task_index, num_tasks=num_tasks,
              force=force, reporter=CliReporter())


def figure1(
    cifar: Annotated[Path, typer.Argument(metavar="CIFAR", help="CIFAR-10: cifar-10-python.tar.gz (read without "
                                          "extracting), its extracted cifar-10-batches-py/, image folders "
                                          "train/<class>/, or a "
                                          "folder holding one of these. With --download: the folder to fetch "
                                          "the archive into.")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for figure1.png, figure1.json, figure1.md "
                                      "and the runs' checkpoints.")],
    train_images: Annotated[int, typer.Option(help="A seeded class-balanced subset of this many training images "
                                              "(50000: all of them).", min=10)] = 10_000,
    epochs: Annotated[int, typer.Option(help="The cap: at most this many epochs a run; a run that has not "
                                        "reached the threshold by then makes the factor a bound.", min=1)] = 50,
    seeds: Annotated[int, typer.Option(help="Seeds (0..N-1) at each activation's chosen learning rate.", min=1)
                     ] = 2,
    lrs: Annotated[str, typer.Option(help="The learning-rate grid, comma separated; widened when an "
                                     "activation's best rate is at its edge.")] = "0.01,0.03,0.1",
    threshold: Annotated[float, typer.Option(help="The training error whose first crossing is timed (the "
                                             "paper's 25%).")] = 0.25,
    init: Annotated[str, typer.Option(metavar="cuda-convnet|imagenet|torch", help="cuda-convnet (its CIFAR-10 "
                                      "example's N(0, σ) per layer, pixels "
                                      "0..255 minus the mean), imagenet (§5's N(0, 0.01), the same pixels) or torch "
                                      "(PyTorch's own init, pixels 0..1). docs/figure1.md: what each gives.")
                    ] = "cuda-convnet",
    batch_size: Annotated[int, typer.Option(help="Images per SGD step.", min=1)] = 128,
    devices: Annotated[str, typer.Option(help="auto (one sweep per GPU, or both on one GPU, or cpu,cpu with "
                                         "half the cores each), or one or two devices: cpu, cpu,cpu, cuda:0, "
                                         "cuda:0,cuda:1. Not part of the cache key.")] = "auto",
    download: Annotated[bool, typer.Option("--download", help="Fetch the official archive into CIFAR through "
                                           "torchvision first (needs a network).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start every run over.")] = False,
):
    """§3.1's Figure 1 as the paper ran it: a four-layer CNN on CIFAR-10 with ReLUs against tanh, each at its own
    fastest learning rate (a sweep), timed in training images to 25% training error → figure1.png, figure1.json,
    figure1.md. Cached: a rerun does nothing, a killed run resumes at its last finished epoch."""
    from stages import figure1 as stage

    stage.run(cifar, out, train_images=train_images, epochs=epochs, seeds=seeds, lrs=numbers(lrs, "lrs"),
              threshold=threshold, init=init, batch_size=batch_size, devices=devices, fetch=download, force=force,
              reporter=CliReporter())
