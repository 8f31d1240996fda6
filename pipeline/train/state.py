"""A run's state on disk and its identity: where a run stands (`Position`), resuming from the newest checkpoint that
verifies and saving one, and the one rule for what belongs to this run: the settings recorded in `_run.json` when
the folder is claimed, which every checkpoint's spec must match to be resumed."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.augment.order import ORDER_VERSION, rank_slice
from pipeline.board import TrainingBoard
from pipeline.cluster import Placement, broadcast, summed
from pipeline.config import AlexNetConfig, TrainConfig, upgrade_trajectory
from pipeline.engine import (
    MARKER,
    Input,
    atomic_write,
    canonical_json,
    changed_fields,
    describe_changes,
    sha256_file,
    write_json,
)
from pipeline.errors import PipeError
from pipeline.records import (
    CHECKPOINTS_DIR,
    DIVERGED,
    METRICS,
    RUN_SETTINGS,
    CheckpointRef,
    DivergedAt,
    EpochRecord,
    LoaderPosition,
    Pca,
    RunSettings,
    RunSpec,
    StageMarker,
    StepRecord,
    Topology,
)
from pipeline.train.checkpoints import (
    TrainCheckpoint,
    load_checkpoint,
    newest_good_checkpoint,
    non_finite_tensors,
    save_checkpoint,
    verifies,
)

if TYPE_CHECKING:
    import torch

    from pipeline.model import AlexNet
    from pipeline.train.guard import Health, StopFlag
    from pipeline.train.speed import TrainingSpeed


@dataclass
class Position:
    """Where the loop is: the epoch, the global step, the loader position to resume inside the epoch (None: from
    its start), the (global) losses logged so far in the epoch, for its mean train loss, and [top-1 mistakes,
    images] of the batches trained so far in it (this rank's since the last save, which holds the global sums)."""

    epoch: int = 0
    step: int = 0
    loader: LoaderPosition | None = None
    epoch_losses: list = field(default_factory=list)
    stopped: str | None = None  # the signal that stopped the run (its checkpoint is written)
    resumed_from: str | None = None  # the checkpoint this start resumed from
    epoch_mistakes: list = field(default_factory=lambda: [0, 0])
    health: Health | None = None


@dataclass
class Progress:
    """What `fit` reports: once where the run starts (after the resume line, so that a rerun's first line says where
    it resumes), then after every step with (step, total_steps, fields)."""

    on_start: Callable[[], None] = lambda: None
    on_step: Callable[[int, float, StepRecord], None] = lambda step, total, record: None
    on_epoch: Callable[[EpochRecord], None] = lambda record: None
    info: Callable[[str], None] = lambda message: None
    warn: Callable[[str], None] = lambda message: None


@dataclass
class Run:
    """What the steps of one training run share: the model, its optimizer and schedule, settings, folder, rank."""

    model: AlexNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    spec: RunSpec  # stored in each checkpoint
    place: Placement
    out: Path
    progress: Progress
    speed: TrainingSpeed  # data_wait, step_ms, mfu of the logged steps
    stop: StopFlag | None = None
    board: TrainingBoard = field(default_factory=TrainingBoard.off)  # TensorBoard events: fit opens them

    @property
    def cfg(self) -> TrainConfig:
        return self.spec.train

    @property
    def main_rank(self) -> bool:
        return self.place.rank == 0

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINTS_DIR

    @property
    def metrics(self) -> Path:
        return self.out / METRICS

    @property
    def rows(self) -> slice:
        """This rank's rows of each global batch."""
        return rank_slice(self.cfg.batch_size, self.place.rank, self.place.world_size)


@dataclass(frozen=True)
class Outcome:
    """Where `fit` left the run: the epoch and step reached, the newest checkpoint, and the signal that stopped it
    (None: it reached its last epoch or max_steps)."""

    epoch: int
    step: int
    checkpoint: str
    stopped: str | None = None


def resume(run: Run) -> Position:
    """From the newest checkpoint that verifies (rank 0 chooses, damaged ones set aside): weights, optimizer,
    schedule and position; metrics logged after it are dropped (they will be logged again). Without one: a fresh
    start with an empty metrics.jsonl."""
    chosen = newest_good_checkpoint(run.checkpoints, run.progress.warn) if run.main_rank else None
    chosen = broadcast(chosen, run.place)
    if chosen is None:
        if run.main_rank:
            _truncate_metrics(run.metrics, -1)
        return Position()
    saved = load_checkpoint(chosen)
    check_resumable(saved, run.spec, chosen)
    run.model.load_state_dict(saved.model)
    run.optimizer.load_state_dict(saved.optimizer)
    run.scheduler.load_state_dict(saved.scheduler)
    if run.main_rank:
        _truncate_metrics(run.metrics, saved.step)
        ranks = f" on {run.place.world_size} rank(s), written by {saved.spec.topology.world_size}" \
            if saved.spec.topology.world_size != run.place.world_size else ""
        run.progress.info(f"train: resuming from step {saved.step}, epoch {saved.epoch} ({chosen}){ranks}")
    # the epoch's global mistake sums so far: counted once, by rank 0
    return Position(saved.epoch, saved.step, saved.loader, list(saved.epoch_losses),
                    epoch_mistakes=list(saved.epoch_mistakes) if run.main_rank else [0, 0], resumed_from=str(chosen))


def save(run: Run, at: Position, loader: LoaderPosition) -> None:
    """A checkpoint of the run at `at`, its weights finite (rank 0 writes; the epoch's mistakes so far are summed
    over the ranks, so a resume on any number of ranks counts them once)."""
    from pipeline.train.guard import check_health  # torch: only a training process saves

    check_health(run, at, weights=True)
    mistakes = summed([float(n) for n in at.epoch_mistakes], run.place)
    if run.main_rank:
        checkpoint = TrainCheckpoint(run.model.state_dict(), run.optimizer.state_dict(), run.scheduler.state_dict(),
                                     at.epoch, at.step, loader, run.spec, list(at.epoch_losses),
                                     [int(n) for n in mistakes])
        save_checkpoint(run.checkpoints, at.step, checkpoint.to_state(), run.cfg.keep_checkpoints)
    at.epoch_mistakes = [int(n) for n in mistakes] if run.main_rank else [0, 0]


def topology(cfg: TrainConfig, place: Placement) -> Topology:
    """What the order of an epoch depends on (its version and the global batch), and the world size that wrote."""
    return Topology(ORDER_VERSION, cfg.batch_size, place.world_size)


def check_resumable(checkpoint: TrainCheckpoint, now: RunSpec, path: Path) -> None:
    """A checkpoint resumes only this run: its identity (pca.json's numbers were compared when the folder was
    claimed, its digest may change with pca-stats' version), the same epoch order and global batch (any number of
    ranks), finite weights."""
    saved = checkpoint.spec
    RunIdentity(now.trajectory()).check(saved.trajectory(), f"{path} was written with other settings than this "
                                        "run's", ignore=("inputs.pca",))
    if saved.topology.order != now.topology.order:
        raise PipeError(f"{path} was written with epoch order version {saved.topology.order} (each rank read its own "
                        f"part of DALI's reader); this version computes every epoch's order from (seed, epoch) and "
                        "cannot continue a run halfway through another order: finish it with the version that started "
                        "it, or rerun with --force to start over")
    bad = non_finite_tensors(checkpoint.model)
    if bad:
        raise PipeError(f"{path}: expected finite weights, found {len(bad)} tensor(s) with nan or inf (first: "
                        f"{bad[0]}); the run diverged: --force to start over (with a lower --lr)")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we resume from (they will be logged again) and a line cut
    short by a crash; a fresh start (step -1) keeps none."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in keep))


def run_trajectory(model: AlexNetConfig, cfg: TrainConfig, inputs: dict[str, Input]) -> dict:
    """The settings a run's checkpoints belong to: the model, the result-changing training settings, the inputs."""
    return {"model": model.to_dict(), "train": cfg.trajectory(), "inputs": {k: v.digest for k, v in inputs.items()}}


@dataclass(frozen=True)
class RunIdentity:
    """The one answer to "does this belong to this run?": the run's trajectory (`run_trajectory`). `_run.json`
    records it when the folder is claimed, the train stage's key hashes it (with the run's extent), and a
    checkpoint's spec must agree with it to be resumed; whatever disagrees is named, old → new, in one line."""

    trajectory: dict

    @property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.trajectory).encode()).hexdigest()[:16]

    def check(self, recorded: dict, found: str, ignore: tuple[str, ...] = ()) -> None:
        """Refuse `recorded` settings that differ from this run's (`found` says where they were found)."""
        if changed := describe_changes(recorded, self.trajectory, ignore=ignore):
            raise PipeError(f"{found} ({changed}); use another --out, or --force to start this run over")

    def claim(self, out: Path, force: bool, main_rank: bool, pca_path: Path, info: Callable[[str], None]) -> None:
        """Take `out` for this run (its _run.json), unless it holds another's. One exception: a pca.json whose
        digest changed while its numbers did not (pca-stats' VERSION 2 recomputed the eigen-pairs without BLAS: the
        same PCA to ~1e-16, new bytes) is adopted, so a run in progress continues instead of starting over."""
        path = out / RUN_SETTINGS
        old = upgrade_trajectory(RunSettings.read(path).settings) if path.is_file() else self.trajectory
        if not force and changed_fields(old, self.trajectory) == ["inputs.pca"] and \
                (adopted := _recomputed_pca(out, pca_path)) is not None:
            info(adopted)
        elif not force:
            self.check(old, f"{out} holds a run with other settings")
        if not main_rank:
            return
        if force:
            shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
            for name in (METRICS, MARKER, DIVERGED):
                (out / name).unlink(missing_ok=True)
        (out / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
        write_json(path, RunSettings(self.key, self.trajectory).to_json())


def final_checkpoint_problem(out: Path, marker: StageMarker | None) -> str | None:
    """Why a finished run is not done after all: its final checkpoint (recorded in the done marker) is missing, not
    the size it was written with (set aside as damaged, cut, replaced) or damaged in place (its sha256; the verdict
    is cached by size and mtime, so an up-to-date check hashes it once)."""
    final = marker.final if marker else None
    if final is None:
        return None
    size = final.bytes
    checkpoint = out / CHECKPOINTS_DIR / Path(final.checkpoint).name
    if not checkpoint.is_file():
        return f"its final checkpoint {checkpoint.name} is missing"
    if size is not None and checkpoint.stat().st_size != size:
        return f"its final checkpoint {checkpoint.name} is {checkpoint.stat().st_size:,} bytes, not {size:,}"
    if not verifies(checkpoint):
        return f"its final checkpoint {checkpoint.name} does not match its sha256 (damaged in place)"
    return None


def diverged_record(out: Path) -> DivergedAt | None:
    """The run's _diverged.json (the step whose loss was not finite), when it diverged."""
    path = out / DIVERGED
    return DivergedAt.read(path) if path.is_file() else None


def _recomputed_pca(out: Path, pca_path: Path) -> str | None:
    """Why this run may go on with `pca_path` although its digest is not the run's: its mean and eigen-pairs equal
    those in the run's newest checkpoint to PCA_SAME_TOL (or no checkpoint exists yet). None: they differ."""
    from pipeline.pca import PCA_SAME_TOL, pca_difference
    from pipeline.train.checkpoints import latest_checkpoint, load_checkpoint

    checkpoint = latest_checkpoint(out / CHECKPOINTS_DIR)
    new = Pca.read(pca_path).stats
    if checkpoint is not None:
        difference = pca_difference(load_checkpoint(checkpoint).spec.pixels, new)
        if difference > PCA_SAME_TOL:
            return None
        said = (f"its mean and eigen-pairs equal those {checkpoint.name} trained with (largest difference "
                f"{difference:.1g})")
    else:
        said = "no checkpoint was written with the old one"
    return (f"train: {pca_path} is not the file this run started with, but {said}: the run goes on with it "
            "(pca-stats recomputes the same PCA in bits that no longer depend on the CPU)")


def eval_is_of_run(run: Path, evaluated: CheckpointRef) -> str | None:
    """Why an eval (its checkpoint's sha256) is not of this run, or None: its digest must be one of the run's
    checkpoints' (read from the digests beside them; a checkpoint without one is hashed)."""
    from pipeline.train.checkpoints import checkpoints, digest_path

    if not evaluated.sha256:
        return None  # an eval.json written before checkpoint digests were recorded: nothing to compare
    found = checkpoints(run / CHECKPOINTS_DIR)
    digests = {digest_path(p).read_text().strip() if digest_path(p).is_file() else sha256_file(p) for p in found}
    if evaluated.sha256 in digests:
        return None
    return (f"it evaluated {evaluated.path} (step {evaluated.step}, sha256 {evaluated.sha256[:12]}…), which is not "
            f"one of the {len(found)} checkpoint(s) of {run}")


def count_mistakes(at: Position, mistakes: torch.Tensor, images: int) -> None:
    """Add a batch's top-1 mistakes to the epoch's (kept as a tensor on the device: no sync per step)."""
    at.epoch_mistakes = [at.epoch_mistakes[0] + mistakes, at.epoch_mistakes[1] + images]


def train_top1_error(at: Position, place: Placement) -> float | None:
    """The epoch's top-1 error on its training batches as they were trained (augmented, dropout on), over ranks."""
    wrong, seen = summed([float(at.epoch_mistakes[0]), float(at.epoch_mistakes[1])], place)
    return round(wrong / seen, 6) if seen else None
