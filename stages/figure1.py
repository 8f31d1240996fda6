"""Stage `figure1`: §3.1's Figure 1 on CIFAR-10 (`pipeline/experiments/`) → figure1.png, figure1.json, figure1.md.

Units: one per run, `<activation>-lr<rate>-seed<k>`, learned as the sweep goes (the protocol picks the next run from
the finished ones, so a rerun replays the same choices from the records). A run in flight saves runs/<unit>.pt after
every finished epoch and resumes there when killed. The two activations' sweeps are independent: on two devices
(auto on a CPU: cpu,cpu, half the cores each) they run side by side, one process each.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.board import BOARD, figure1_events
from pipeline.engine import (
    Input,
    QuietReporter,
    Reporter,
    Stage,
    StageResult,
    atomic_write,
    exit_with_parent,
    write_json,
)
from pipeline.errors import PipeError
from pipeline.experiments.figure1 import ACTIVATIONS, NAMES, next_run, plot, summarize, table_markdown
from pipeline.experiments.figure1_net import INITS, Run, RunCheckpoint, Setup, train_run
from pipeline.records import FIGURE1, Figure1Run, to_plain
from pipeline.sources.cifar import (
    CifarSource,
    balanced_subset,
    channel_mean,
    download,
    find_source,
    read_training_split,
)

VERSION = 1
# The defaults (docs/figure1.md): about 30 minutes on two CPU cores, each activation's fastest rate inside the grid
# or one widening step from it (measured on 5,000 images: ReLU 0.003, tanh 0.081).
DEFAULT_TRAIN_IMAGES = 10_000
DEFAULT_EPOCHS = 50
DEFAULT_LRS = (0.01, 0.03, 0.1)
DEFAULT_SEEDS = 2
SUBSET_SEED = 0  # the images are the experiment's, not a run's: every run of every seed trains on the same ones


def run(cifar: Path, out: Path, *, train_images: int | None = DEFAULT_TRAIN_IMAGES, epochs: int = DEFAULT_EPOCHS,
        seeds: int = DEFAULT_SEEDS, lrs: tuple[float, ...] = DEFAULT_LRS, threshold: float = 0.25,
        init: str = "cuda-convnet", batch_size: int = 128, devices: str = "auto", fetch: bool = False,
        force: bool = False, reporter: Reporter | None = None) -> StageResult:
    """Both activations' sweeps, then the figure, its data and its table. The product is the summary."""
    reporter = reporter or QuietReporter()
    for name, value, ok in (("lrs", ",".join(map(str, lrs)), lrs and min(lrs) > 0), ("epochs", epochs, epochs >= 1),
                            ("seeds", seeds, seeds >= 1), ("batch_size", batch_size, batch_size >= 1),
                            ("threshold", threshold, 0 < threshold < 1)):
        if not ok:
            raise PipeError(f"expected {'a training error in (0, 1)' if name == 'threshold' else 'positive'}, got "
                            f"{value}", option=name)
    if train_images is not None and train_images < batch_size:
        raise PipeError(f"{train_images} is less than one batch ({batch_size})", option="train_images")
    if init not in INITS:
        raise PipeError(f"expected one of {', '.join(INITS)}, got {init!r}", option="init")
    try:
        source = find_source(cifar)
    except PipeError:
        if not fetch:
            raise
        source = find_source(download(cifar))  # only when CIFAR does not hold the data yet
    setup = Setup(lrs=tuple(sorted(set(lrs))), epochs=epochs, seeds=seeds, threshold=threshold, init=init,
                  batch_size=batch_size)
    stage = Stage("figure1", VERSION, out, {"setup": to_plain(setup), "train_images": train_images},
                  {"cifar": Input.of_source(source.path)}, product=FIGURE1,
                  outputs=(FIGURE1, "figure1.md", "figure1.png", "runs/*.pt"))
    places = _places(devices)
    return stage.execute(lambda: _sweeps(stage, source, train_images, setup, places, reporter), say=reporter,
                         force=force, shown=out / "figure1.md", units=[])


def _sweeps(stage: Stage, source: CifarSource, train_images: int | None, setup: Setup,
            places: list[tuple[str, int]], reporter: Reporter) -> StageResult:
    """Both activations' sweeps (side by side on two places), then the figure, its data and its table."""
    out = stage.out
    if setup.seeds < 2:
        reporter.warn("--seeds 1: the factor comes without the seeds' spread")
    sweeps = [_Sweep(stage, source, train_images, setup, activation, *places[i % len(places)], reporter)
              for i, activation in enumerate(ACTIVATIONS)]
    reporter.info(f"figure1: {source.describe()}; ReLU and tanh sweeps on "
                  f"{' and '.join(d for d, _ in places)}" + (" side by side" if len(places) > 1 else ""))
    if len(places) > 1:
        import multiprocessing

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch"])  # imported once, not once a sweep
        with ProcessPoolExecutor(len(sweeps), mp_context=context, initializer=exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            records = [r for rs in pool.map(_run_sweep, sweeps) for r in rs]
    else:
        records = [r for sweep in sweeps for r in sweep()]
    records.sort(key=lambda r: (ACTIVATIONS.index(r.activation), r.lr, r.seed))
    summary = summarize(records, setup)
    described = _description(source, setup, records, train_images)

    def write_products() -> None:
        result = replace(summary, setup={**to_plain(setup), "train_images": train_images}, description=described,
                         runs=tuple(records))
        write_json(out / FIGURE1, result.to_json())
        plot(summary, records, out / "figure1.png")
        with atomic_write(out / "figure1.md", "w") as f:
            f.write(table_markdown(summary, records, described))

    finished = stage.finalize(write_products, runs=len(records))
    figure1_events(out / BOARD, records, reporter.warn)
    reporter.info(f"figure1: {len(records)} runs → {out / 'figure1.md'}")
    return StageResult(stage.name, out, finished=finished, product=summary)


def _places(devices: str) -> list[tuple[str, int]]:
    """(device, CPU threads) per sweep process: auto is both GPUs, one GPU twice, or the CPU twice with half the
    cores each (one process per activation either way)."""
    cores = len(os.sched_getaffinity(0))
    if devices == "auto":
        import torch

        gpus = torch.cuda.device_count()
        chosen = ["cuda:0", "cuda:1" if gpus > 1 else "cuda:0"] if gpus else ["cpu", "cpu"] if cores > 1 else ["cpu"]
    else:
        chosen = [d.strip() for d in devices.split(",") if d.strip()]
        if not 1 <= len(chosen) <= 2 or not all(re.fullmatch(r"cpu|cuda(:\d+)?|mps", d) for d in chosen):
            raise PipeError(f"expected auto or one or two devices such as cpu, cpu,cpu, cuda:0,cuda:1; got "
                            f"{devices!r}", option="devices")
    on_cpu = sum(d == "cpu" for d in chosen)
    return [(d, max(1, cores // on_cpu) if d == "cpu" else 1) for d in chosen]


def _description(source: CifarSource, setup: Setup, records: list[Figure1Run], train_images: int | None) -> str:
    per_epoch = records[0].images_per_epoch if records else 0
    subset = "all the" if train_images is None else f"a seeded class-balanced subset of {train_images:,}"
    return (f"CIFAR-10, {subset} training images ({source.describe()}); {per_epoch:,} images an epoch in batches of "
            f"{setup.batch_size}. The four-layer net of cuda-convnet's CIFAR-10 example (conv 5×5 32, max-pool; conv "
            f"5×5 32, avg-pool; conv 5×5 64, avg-pool; fc 10; no response normalisation), the same in both runs but "
            f"for the neuron; init {setup.init}; SGD, momentum {setup.momentum:g}, no weight decay, dropout or "
            f"augmentation; per-channel mean subtracted. Rates tried from the grid "
            f"{', '.join(f'{lr:g}' for lr in setup.lrs)} (widened at its edges), each activation at its fastest; "
            f"seeds 0..{setup.seeds - 1} at the chosen rates; at most {setup.epochs} epochs a run.")


@dataclass(frozen=True)
class _Sweep:
    """One activation's sweep, run by run; each run a unit of the stage. Picklable: it may run in its own process."""

    stage: Stage
    source: CifarSource
    train_images: int | None
    setup: Setup
    activation: str
    device: str
    threads: int
    reporter: Reporter

    def __call__(self) -> list[Figure1Run]:
        records: list[Figure1Run] = []
        data = None  # read only when a run is still to do: a sweep whose runs all finished reads nothing
        while (run := next_run(self.activation, records, self.setup)) is not None:
            if not self.stage.unit_done(run.name):
                data = data or self._data()
                self.stage.plan([run.name])

                def train(_: str, run: Run = run, data: tuple = data) -> Figure1Run:
                    return self._train(run, *data)

                self.stage.run_units([run.name], train)
                (self.stage.out / "runs" / f"{run.name}.pt").unlink(missing_ok=True)
            records.append(Figure1Run.from_json(self.stage.records([run.name])[run.name]))
        return records

    def _data(self) -> tuple:
        import torch

        torch.set_num_threads(self.threads)
        split = read_training_split(self.source)
        chosen = balanced_subset(split.labels, self.train_images, SUBSET_SEED)
        images = split.images(chosen)
        return (torch.from_numpy(images).to(self.device), torch.from_numpy(split.labels[chosen]).to(self.device),
                channel_mean(images))

    def _train(self, run: Run, images, labels, mean: list[float]) -> Figure1Run:
        import torch

        checkpoint = self.stage.out / "runs" / f"{run.name}.pt"
        state = RunCheckpoint.from_state(torch.load(checkpoint, map_location=self.device, weights_only=True)) \
            if checkpoint.is_file() else None
        if state is not None:
            self.reporter.info(f"figure1: {run.name}: resuming after epoch {state.epoch}")

        def end_of_epoch(state: RunCheckpoint) -> None:
            with atomic_write(checkpoint) as f:
                torch.save(state.to_state(), f)
            e = state.epochs[-1]
            self.reporter.info(f"figure1: {run.name} epoch {e.epoch}: training error {e.training_error:.1%} "
                               f"({e.seconds:.1f} s)")

        record = train_run(run, self.setup, images, labels, mean, state=state, on_epoch=end_of_epoch)
        figure1_events(self.stage.out / BOARD, [record], self.reporter.warn)
        reached = record.epochs_to_threshold
        self.reporter.info(f"figure1: {NAMES[run.activation]} lr {run.lr:g} seed {run.seed}: " + (
            f"{self.setup.threshold:.0%} at epoch {reached:.1f}" if reached is not None else
            {"behind": "stopped, behind the best", "cap": "the cap, never reached", "diverged": "diverged"}
            [record.end]) + f", {record.seconds:.0f} s")
        return record


def _run_sweep(sweep: _Sweep) -> list[Figure1Run]:
    return sweep()
