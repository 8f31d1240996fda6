"""Training: plain functions (step, optimizer, checkpoints) and one loop, `fit`, that resumes exactly.

A checkpoint is a plain dict (model, optimizer, scheduler, epoch, step, the loader's position, the epoch's logged
losses and training mistakes so far, the run's spec) loadable with `torch.load(weights_only=True)`, written
atomically as checkpoints/step-%09d.pt. Nothing random lives in a rank: the loader's draws are computed from (seed,
epoch, batch, position) and the dropout masks from (seed, step) for the whole global batch, so a checkpoint needs no
RNG state, a new rank receives only the run's position, and a run may resume on another number of ranks (the global
batch kept: the world size changes only the order of float sums). On the CPU a run killed mid-epoch and resumed ends
with the same weights and metrics as an uninterrupted one.

SIGTERM/SIGUSR1/SIGINT stop the run at a step boundary with a checkpoint; a loss that is not finite ends it at the
next log line or checkpoint (where the run syncs anyway) without a checkpoint of the diverged weights.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment.order import ORDER_VERSION, rank_slice
from pipeline.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    newest_good_checkpoint,
    non_finite_tensors,
    save_checkpoint,
)
from pipeline.cluster import Placement
from pipeline.config import AlexNetConfig, TrainConfig
from pipeline.engine import append_line, atomic_write, describe_changes, write_json
from pipeline.errors import Diverged, PipeError
from pipeline.model import AlexNet, build_model, count_parameters, dropout_masks, forward_flops
from pipeline.record import append_event
from pipeline.records import CHECKPOINTS_DIR, DIVERGED, METRICS, EpochRecord, RunSpec, StepRecord, Topology
from pipeline.runs import RunData
from pipeline.session import Session
from pipeline.speed import TrainingSpeed

if TYPE_CHECKING:
    from pipeline.augment.loading import TrainEpochs

# Slurm's preemption and time-limit warnings, and Ctrl-C: checkpoint at the next step boundary, then exit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
CHANCE_MARGIN = 1.5  # val top-1 error above 1 - CHANCE_MARGIN/K (K val classes) is chance level: nothing learnt yet
FLAT_LOSS = 0.01  # an epoch's mean train loss within 1% of ln(C): the net has not started learning


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """plateau: §5's lr/10 when the val error stops improving (at most `lr_drops` times); step: lr/10 every
    `lr_step_epochs` epochs (torchvision's reference recipe: 30), also at most `lr_drops` times."""
    if cfg.lr_schedule == "step":
        milestones = [cfg.lr_step_epochs * (i + 1) for i in range(cfg.lr_drops)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=cfg.lr_patience, min_lr=cfg.lr * 0.1**cfg.lr_drops * 0.999)


def at_chance(top1_error: float, val_classes: int) -> bool:
    """Is a val top-1 error no better than guessing among the `val_classes` classes present (with a margin for
    the noise of a small val set)?"""
    return top1_error > 1 - CHANCE_MARGIN / max(val_classes, 1)


def schedule_epoch(scheduler, optimizer: torch.optim.Optimizer, top1_error: float, val_classes: int) -> dict:
    """Let the schedule see one epoch's val error; what it did, for the epoch's record: the plateau rule is not
    shown an error at chance level (a slow start is not a plateau: §5's init keeps the loss at ln C for epochs)."""
    before = optimizer.param_groups[0]["lr"]
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if at_chance(top1_error, val_classes):
            return {"lr_held": f"val top-1 error {top1_error:.4f} is at chance level for {val_classes} classes"}
        scheduler.step(top1_error)
        reason = f"val top-1 error has not improved on {scheduler.best:.4f} for {scheduler.patience + 1} epochs"
    else:
        scheduler.step()
        reason = f"step schedule: epoch {scheduler.last_epoch} is a milestone"
    after = optimizer.param_groups[0]["lr"]
    return {"lr_drop": f"lr {before:g} → {after:g}: {reason}"} if after < before else {}


def flat_loss(losses: list[float], num_classes: int) -> bool:
    """An epoch's mean logged loss within FLAT_LOSS of ln(C): the net still outputs uniform guesses (the mean,
    because one small batch's loss is noisy)."""
    chance = math.log(num_classes)
    return bool(losses) and abs(float(np.mean(losses)) - chance) <= FLAT_LOSS * chance


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, amp: bool = False,
               masks: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on one batch (with this step's dropout masks); returns the (detached) mean cross-entropy loss
    and the number of top-1 mistakes of the logits it trained on (the training error, with no extra pass)."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(images, masks) if masks else model(images)
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(dim=1) != labels).sum()


# ---------------------------------------------------------------------------------------------------------------
# the loop: `fit` over named steps (resume, one epoch, the end of an epoch)


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


@dataclass
class Position:
    """Where the loop is: the epoch, the global step, the loader position to resume inside the epoch (None: from
    its start), the (global) losses logged so far in the epoch, for its mean train loss, and [top-1 mistakes,
    images] of the batches trained so far in it (this rank's since the last save, which holds the global sums)."""

    epoch: int = 0
    step: int = 0
    loader: dict | None = None
    epoch_losses: list = field(default_factory=list)
    stopped: str | None = None  # the signal that stopped the run (its checkpoint is written)
    resumed_from: str | None = None  # the checkpoint this start resumed from
    epoch_mistakes: list = field(default_factory=lambda: [0, 0])
    health: Health | None = None


class Health:
    """Whether every loss so far was finite, kept on the device (no host sync per step): the first step whose loss
    was not (or 0) and that loss. Read only where the run syncs anyway (log lines, checkpoints)."""

    def __init__(self, device: torch.device, step: int):
        self.step = torch.full((), step, dtype=torch.int64, device=device)
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def note(self, loss: torch.Tensor) -> None:
        self.step += 1
        new = (self.first_bad == 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(new, self.step, self.first_bad)
        self.first_bad_loss = torch.where(new, loss.detach().float(), self.first_bad_loss)

    def first_bad_step(self, place: Placement) -> int:
        """The first non-finite step on any rank (0: none), the same answer on every rank."""
        found = self.first_bad.clone()
        if place.distributed:
            import torch.distributed as dist

            found = torch.where(found == 0, torch.iinfo(torch.int64).max, found).cpu()
            dist.all_reduce(found, op=dist.ReduceOp.MIN)
            found = torch.where(found == torch.iinfo(torch.int64).max, 0, found)
        return int(found)


class StopFlag:
    """SIGTERM/SIGUSR1/SIGINT only set a flag: the loop reads it at a step boundary, where the ranks agree on it,
    so a signal during a step, validation or a checkpoint write lets that finish first. The agreement is an
    all-reduce started each step and read the next (no rank waits on it: it has finished by then), so every rank
    stops at the same step, one after the signal reached any of them. A second Ctrl-C quits at once."""

    def __init__(self, place: Placement, announce: bool = True) -> None:
        self.signal: str | None = None
        self.place = place
        self._announce = announce  # rank 0 says what Ctrl-C does; the others keep quiet
        self._pending: tuple | None = None  # (work, tensor) of the all-reduce in flight
        # a process started with SIGINT ignored (a background job of a script, nohup) keeps ignoring it
        self._previous = {s: signal.signal(s, self._set) for s in STOP_SIGNALS
                          if signal.getsignal(s) is not signal.SIG_IGN}

    def _set(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            if self.signal == "SIGINT":
                raise KeyboardInterrupt
            if self._announce:
                os.write(2, b"\ntrain: Ctrl-C: stopping at the next step with a checkpoint (Ctrl-C again: quit now, "
                            b"losing the steps since the last checkpoint)\n")
        self.signal = self.signal or signal.Signals(signum).name  # the first signal names the stop

    def _code(self) -> torch.Tensor:
        return torch.tensor([STOP_SIGNALS.index(signal.Signals[self.signal]) + 1 if self.signal else 0])

    @staticmethod
    def _name(code: torch.Tensor) -> str | None:
        return STOP_SIGNALS[int(code) - 1].name if int(code) else None

    def at_step(self) -> str | None:
        """The agreed signal of the previous step's round (None: none yet); starts this step's round."""
        if not self.place.distributed:
            return self.signal
        import torch.distributed as dist

        agreed = self._finish()
        code = self._code()
        self._pending = (dist.all_reduce(code, op=dist.ReduceOp.MAX, async_op=True), code)
        return agreed

    def now(self) -> str | None:
        """Agreement at once (after validation, before leaving): waits for the round in flight and takes one more."""
        if not self.place.distributed:
            return self.signal
        import torch.distributed as dist

        earlier = self._finish()
        code = self._code()
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return earlier or self._name(code)

    def _finish(self) -> str | None:
        if self._pending is None:
            return None
        work, code = self._pending
        self._pending = None
        work.wait()
        return self._name(code)

    def restore(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass(frozen=True)
class Outcome:
    """Where `fit` left the run: the epoch and step reached, the newest checkpoint, and the signal that stopped it
    (None: it reached its last epoch or max_steps)."""

    epoch: int
    step: int
    checkpoint: str
    stopped: str | None = None


def fit(model: AlexNet, spec: RunSpec, train_loader, val_loader, out: Path, place: Placement,
        progress: Progress | None = None) -> Outcome:
    """Train until the spec's epochs, max_steps or a stop signal, resuming from the newest good checkpoint in
    out/checkpoints; a loss that is not finite raises Diverged."""
    cfg = spec.train
    optimizer = make_optimizer(model, cfg)
    speed = TrainingSpeed(next(model.parameters()).device, forward_flops(spec.model), cfg.amp, cfg.peak_tflops)
    run = Run(model, optimizer, make_scheduler(optimizer, cfg), spec, place, out, progress or Progress(), speed)
    step_fn = wrap_model(model, spec, place)
    # from here a signal is noted, not fatal: the run stops at its next step boundary
    run.stop = StopFlag(place, announce=run.main_rank)
    try:
        at = resume(run)
        at.health = Health(next(model.parameters()).device, at.step)
        run.progress.on_start()
        total = min(cfg.epochs * len(train_loader), cfg.max_steps or math.inf)
        if run.main_rank:  # where this start or resume begins, and what it runs on
            append_event(out, "resume" if at.resumed_from else "start", step=at.step, epoch=at.epoch,
                         total_steps=total, resumed_from=at.resumed_from, world_size=place.world_size)
        while at.epoch < cfg.epochs and at.step < total and not at.stopped:
            if not train_epoch(run, step_fn, train_loader, at, total):
                break  # stopped inside the epoch (max_steps or a signal)
            end_of_epoch(run, val_loader, at)
            at.stopped = run.stop.now()  # a signal during validation: the epoch's checkpoint is written
    finally:
        run.stop.restore()
    return Outcome(at.epoch, at.step, str(latest_checkpoint(run.checkpoints)), at.stopped)


def wrap_model(model: torch.nn.Module, spec: RunSpec, place: Placement):
    """What a step calls: the model, in DDP across ranks (BatchNorm synchronised over them on GPUs, so that its
    statistics are the global batch's; gloo has no SyncBatchNorm, so on the CPU each rank normalises its own
    part), compiled when asked."""
    net = model
    if place.distributed:
        from torch.nn.parallel import DistributedDataParallel

        first = next(model.parameters()).device
        if spec.model.norm == "batch" and first.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        single = len({p.device for p in model.parameters()}) == 1 and first.type == "cuda"
        net = DistributedDataParallel(net, device_ids=[first] if single else None)
    return torch.compile(net) if spec.train.compile else net


def resume(run: Run) -> Position:
    """From the newest checkpoint that verifies (rank 0 chooses, damaged ones set aside): weights, optimizer,
    schedule and position; metrics logged after it are dropped (they will be logged again). Without one: a fresh
    start with an empty metrics.jsonl."""
    chosen = newest_good_checkpoint(run.checkpoints, run.progress.warn) if run.main_rank else None
    chosen = _broadcast(chosen, run.place)
    if chosen is None:
        if run.main_rank:
            _truncate_metrics(run.metrics, -1)
        return Position()
    state = load_checkpoint(chosen)
    saved = RunSpec.of_checkpoint(state)
    check_resumable(saved, run.spec, chosen, state)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.main_rank:
        _truncate_metrics(run.metrics, state["step"])
        ranks = f" on {run.place.world_size} rank(s), written by {saved.topology.world_size}" \
            if saved.topology.world_size != run.place.world_size else ""
        run.progress.info(f"train: resuming from step {state['step']}, epoch {state['epoch']} ({chosen}){ranks}")
    mistakes = state.get("epoch_mistakes", [0, 0])  # the epoch's global sums so far: counted once, by rank 0
    return Position(state["epoch"], state["step"], state["loader"], list(state.get("epoch_losses", [])),
                    epoch_mistakes=list(mistakes) if run.main_rank else [0, 0], resumed_from=str(chosen))


def topology(cfg: TrainConfig, place: Placement) -> Topology:
    """What the order of an epoch depends on (its version and the global batch), and the world size that wrote."""
    return Topology(ORDER_VERSION, cfg.batch_size, place.world_size)


def check_resumable(saved: RunSpec, now: RunSpec, path: Path, state: dict) -> None:
    """A checkpoint resumes only this run: the same result-changing settings and shards (another width, lr or
    dropout in the run folder is named, one line; pca.json's numbers were compared when the folder was claimed, its
    digest may change with pca-stats' version), the same epoch order and global batch (any number of ranks),
    finite weights."""
    changed = describe_changes(saved.trajectory(), now.trajectory(), ignore=("inputs.pca",))
    if changed:
        raise PipeError(f"{path} was written with other settings than this run's ({changed}); "
                        "use another --out, or --force to start this run over")
    if saved.topology.order != now.topology.order:
        raise PipeError(f"{path} was written with epoch order version {saved.topology.order} (each rank read its own "
                        f"part of DALI's reader); this version computes every epoch's order from (seed, epoch) and "
                        "cannot continue a run halfway through another order: finish it with the version that started "
                        "it, or rerun with --force to start over")
    bad = non_finite_tensors(state["model"])
    if bad:
        raise PipeError(f"{path}: expected finite weights, found {len(bad)} tensor(s) with nan or inf (first: "
                        f"{bad[0]}); the run diverged: --force to start over (with a lower --lr)")


def train_epoch(run: Run, step_fn, train_loader, at: Position, total: float) -> bool:
    """Train the rest of epoch `at.epoch` (from the loader position when resuming inside it), logging every
    `log_every` steps and checkpointing every `checkpoint_every`. True when the epoch ran to its end; False when it
    stopped at `total` steps or a signal inside it."""
    cfg = run.cfg
    assert at.health is not None  # fit sets it before the first epoch
    train_loader.set_epoch(at.epoch)
    resuming = at.loader is not None and at.loader.get("epoch") == at.epoch
    if resuming:
        train_loader.load_state_dict(at.loader)
    if not resuming:
        at.epoch_losses, at.epoch_mistakes = [], [0, 0]
    at.loader = None
    steps_per_epoch = len(train_loader)
    run.model.train()
    t_last, seen = time.perf_counter(), 0
    run.speed.fetch_started()
    for images, labels in train_loader:
        run.speed.fetch_done()
        masks = dropout_masks(run.model, cfg.seed, at.step, run.rows, cfg.batch_size)
        loss, mistakes = train_step(step_fn, run.optimizer, images, labels, cfg.amp, masks)
        at.health.note(loss)
        count_mistakes(at, mistakes, len(labels))
        at.step += 1
        seen += cfg.batch_size
        if at.step % cfg.log_every == 0 or at.step == total:
            log_step(run, at, loss, seen, time.perf_counter() - t_last, total)
            t_last, seen = time.perf_counter(), 0
        end_of_epoch = at.step % steps_per_epoch == 0  # checkpointed by end_of_epoch, after validation
        at.stopped = run.stop.at_step() if run.stop else None
        if not end_of_epoch and (at.step % cfg.checkpoint_every == 0 or at.step >= total or at.stopped):
            save(run, at, train_loader.state_dict())
        if (at.step >= total or at.stopped) and not end_of_epoch:
            return False
        run.speed.fetch_started()
    return True


def log_step(run: Run, at: Position, loss: torch.Tensor, images: int, elapsed: float, total: float) -> None:
    """A metrics line: the global batch's loss (the mean over ranks), images/s over every rank, the speed fields;
    a loss that is not finite (here or at an earlier step) ends the run."""
    check_health(run, at)
    if run.place.distributed:
        import torch.distributed as dist

        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= run.place.world_size
    loss_value = loss.item()
    at.epoch_losses.append(loss_value)
    record = StepRecord(step=at.step, epoch=at.epoch, loss=round(loss_value, 6),
                        lr=run.optimizer.param_groups[0]["lr"], images_per_s=round(images / elapsed, 1),
                        **run.speed.fields(images / run.place.world_size / elapsed), time=round(time.time(), 3))
    if run.main_rank:
        _append_metrics(run.metrics, record)
    run.progress.on_step(at.step, total, record)


def check_health(run: Run, at: Position, weights: bool = False) -> None:
    """Diverged (every rank alike) when some step's loss was not finite, or (`weights`, before a checkpoint) the
    last update left weights that are not: no checkpoint of those weights, the last finite one kept, the run
    recorded as diverged at that step in _diverged.json and events.jsonl."""
    first_bad = at.health.first_bad_step(run.place) if at.health else 0
    if first_bad:
        assert at.health is not None  # first_bad is 0 without it
        mine = int(at.health.first_bad) == first_bad
        said = f"loss {float(at.health.first_bad_loss)}" if mine else "a loss that was not finite on another rank"
    elif weights and not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        first_bad, said = at.step, "weights that are not finite after the update"  # the same on every rank
    else:
        return
    last = latest_checkpoint(run.checkpoints)
    if run.main_rank:
        write_json(run.out / DIVERGED, {"step": first_bad, "detected_at": at.step, "last_checkpoint":
                                        last.name if last else None})
        append_event(run.out, "diverged", step=first_bad, epoch=at.epoch)
    kept = f"the last finite checkpoint, {last}, is kept" if last else "no checkpoint was written"
    raise Diverged(f"train: diverged: {said} at step {first_bad} (seen at step {at.step}); {kept}; "
                   "rerun with a lower --lr and --force", step=first_bad)


def end_of_epoch(run: Run, val_loader, at: Position) -> None:
    """Validate, let the plateau rule see the val error, log the epoch and checkpoint the start of the next one."""
    check_health(run, at)
    val = validate(run.model, val_loader, run.cfg.amp, run.place)
    schedule = schedule_epoch(run.scheduler, run.optimizer, val["top1_error"], run.spec.val_classes)
    losses = at.epoch_losses
    record = EpochRecord(epoch=at.epoch, step=at.step, val_top1_error=val["top1_error"],
                         val_top5_error=val["top5_error"], val_samples=val["samples"],
                         lr=run.optimizer.param_groups[0]["lr"],
                         train_loss=round(float(np.mean(losses)), 6) if losses else None,
                         train_top1_error=train_top1_error(at, run.place), **schedule,
                         not_learning=True if at.epoch >= 1 and flat_loss(losses, run.spec.model.num_classes)
                         else None, time=round(time.time(), 3))
    if run.main_rank:
        _append_metrics(run.metrics, record)
    run.progress.on_epoch(record)
    said = f"epoch {at.epoch + 1}/{run.cfg.epochs}"  # counted from 1, as the epoch lines and `status` count them
    for note in (record.lr_drop, record.lr_held):
        if note:
            run.progress.info(f"{said}: {note}")
    if record.not_learning:
        run.progress.warn(f"{said}: the training loss has stayed within {FLAT_LOSS:.0%} of "
                          f"ln({run.spec.model.num_classes}) for the whole epoch: the net has not started "
                          "learning (try --init default, a higher --lr, or check the labels)")
    at.epoch += 1
    at.epoch_losses, at.epoch_mistakes = [], [0, 0]
    save(run, at, {"epoch": at.epoch, "batches": 0})


def save(run: Run, at: Position, loader_state: dict) -> None:
    """A checkpoint of the run at `at`, its weights finite (rank 0 writes; the epoch's mistakes so far are summed
    over the ranks, so a resume on any number of ranks counts them once)."""
    check_health(run, at, weights=True)
    mistakes = _summed([float(n) for n in at.epoch_mistakes], run.place)
    if run.main_rank:
        save_checkpoint(run.checkpoints, at.step, {
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "epoch": at.epoch, "step": at.step, "loader": loader_state,
            "epoch_losses": list(at.epoch_losses), "epoch_mistakes": [int(n) for n in mistakes],
            "config": run.spec.to_json()},
            run.cfg.keep_checkpoints)
    at.epoch_mistakes = [int(n) for n in mistakes] if run.main_rank else [0, 0]


def count_mistakes(at: Position, mistakes: torch.Tensor, images: int) -> None:
    """Add a batch's top-1 mistakes to the epoch's (kept as a tensor on the device: no sync per step)."""
    at.epoch_mistakes = [at.epoch_mistakes[0] + mistakes, at.epoch_mistakes[1] + images]


def train_top1_error(at: Position, place: Placement) -> float | None:
    """The epoch's top-1 error on its training batches as they were trained (augmented, dropout on), over ranks."""
    wrong, seen = _summed([float(at.epoch_mistakes[0]), float(at.epoch_mistakes[1])], place)
    return round(wrong / seen, 6) if seen else None


@torch.no_grad()
def validate(model: torch.nn.Module, val_loader, amp: bool, place: Placement) -> dict:
    """Centre-crop top-1/top-5 error over this rank's part of val, summed over ranks."""
    from pipeline.evaluate import class_probabilities, topk_correct

    probs, labels = class_probabilities(model, val_loader, amp)
    top1, top5, n = _summed([topk_correct(probs, labels, 1).sum().item(), topk_correct(probs, labels, 5).sum().item(),
                             len(labels)], place)
    return {"top1_error": 1 - top1 / n, "top5_error": 1 - top5 / n, "samples": int(n)}


def _summed(values: list[float], place: Placement) -> list[float]:
    """`values` summed over every rank (float64: exact for counts)."""
    counts = torch.tensor(values, dtype=torch.float64)
    if place.distributed:
        import torch.distributed as dist

        dist.all_reduce(counts)
    return counts.tolist()


def _broadcast(value, place: Placement):
    """Rank 0's `value` on every rank."""
    if not place.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _append_metrics(path: Path, record: StepRecord | EpochRecord) -> None:
    append_line(path, json.dumps(record.to_json()))


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


# ---------------------------------------------------------------------------------------------------------------
# setting a run up


@dataclass
class Job:
    """A run ready to fit on this rank: the placed net, this rank's loaders and the spec its checkpoints carry."""

    net: AlexNet
    train_loader: TrainEpochs
    val_loader: object
    spec: RunSpec
    session: Session

    def describe(self) -> str:
        place, cfg = self.session.place, self.spec.train
        return (f"train: {count_parameters(self.net):,} parameters on {','.join(self.session.devices)}, rank "
                f"{place.rank}/{place.world_size}, {len(self.train_loader)} steps/epoch, loader {cfg.loader}")

    @property
    def total_steps(self) -> int:
        cfg = self.spec.train
        return min(cfg.epochs * len(self.train_loader), cfg.max_steps or 1 << 62)


def prepare(model: AlexNetConfig, cfg: TrainConfig, data: RunData, session: Session) -> Job:
    """The net from the seeded initial weights (the same on every rank), placed on this rank's devices; the loaders
    of this rank's part of each epoch with pca.json's pixel statistics; the run's spec."""
    from pipeline.augment import make_eval_loader, make_train_loader
    from pipeline.pca import load_pca

    torch.manual_seed(cfg.seed)  # the initial weights (pipeline.model.initial_model draws the same)
    net = build_model(model, session.devices)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    pixels = load_pca(data.pca_path).stats
    place = session.place
    common: dict[str, Any] = {"crop": model.crop, "rank": place.rank, "world_size": place.world_size,
                              "device": session.devices[0], "num_threads": cfg.loader_threads, "loader": cfg.loader}
    workers: dict[str, Any] = {"workers": cfg.loader_workers} if cfg.loader == "dali" else {}
    train_loader = make_train_loader(data.train_dir, pixels, cfg.batch_size // place.world_size, seed=cfg.seed,
                                     channels_last=cfg.channels_last, **cfg.augment, **workers, **common)
    val_loader = make_eval_loader(data.val_dir, pixels, cfg.eval_batch_size, ten_crop=False, **common)
    spec = RunSpec(model=model, train=cfg, pixels=pixels, classes=data.classes, inputs=data.digests,
                   val_classes=len(data.val.classes), topology=topology(cfg, place), devices=session.devices)
    return Job(net, train_loader, val_loader, spec, session)
