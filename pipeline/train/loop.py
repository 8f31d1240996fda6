"""The training loop, to read top to bottom: `fit` resumes, trains epoch after epoch and validates; `train_epoch`
steps through one epoch, logging and checkpointing at their cadence; `end_of_epoch` validates, lets the schedule see
the val error and checkpoints. torchvision's `train_one_epoch`/`evaluate` shape: explicit arguments, plain values.

Nothing random lives in a rank: the loader's draws are computed from (seed, epoch, batch, position) and the dropout
masks from (seed, step) for the whole global batch, so a checkpoint needs no RNG state and a run may resume on
another number of ranks. `# sync:` marks every place the host waits for the device or the ranks wait for each other.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.board import TrainingBoard
from pipeline.cluster import Placement, summed
from pipeline.engine import append_line
from pipeline.model import AlexNet, dropout_masks, forward_flops
from pipeline.record import append_event
from pipeline.records import EpochRecord, Errors, LoaderPosition, RunSpec, StepRecord
from pipeline.train.checkpoints import latest_checkpoint
from pipeline.train.guard import FLAT_LOSS, Health, StopFlag, check_health, flat_loss
from pipeline.train.schedule import make_optimizer, make_scheduler, schedule_epoch
from pipeline.train.setup import wrap_model
from pipeline.train.speed import TrainingSpeed
from pipeline.train.state import (
    Outcome,
    Position,
    Progress,
    Run,
    count_mistakes,
    resume,
    save,
    train_top1_error,
)


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
        run.board = TrainingBoard.of_run(out, at.step if at.resumed_from else None, run.progress.warn,
                                         enabled=run.main_rank and cfg.tensorboard)
        run.progress.on_start()
        total = min(cfg.epochs * len(train_loader), cfg.max_steps or math.inf)
        if run.main_rank:  # where this start or resume begins, and what it runs on
            append_event(out, "resume" if at.resumed_from else "start", step=at.step, epoch=at.epoch,
                         total_steps=total, resumed_from=at.resumed_from, world_size=place.world_size)
        while at.epoch < cfg.epochs and at.step < total and not at.stopped:
            if not train_epoch(run, step_fn, train_loader, at, total):
                break  # stopped inside the epoch (max_steps or a signal)
            end_of_epoch(run, val_loader, at)
            at.stopped = run.stop.now()  # sync: ranks agree on a signal during validation (its checkpoint is written)
    finally:
        run.stop.restore()
        run.board.close()
    return Outcome(at.epoch, at.step, str(latest_checkpoint(run.checkpoints)), at.stopped)


def train_epoch(run: Run, step_fn, train_loader, at: Position, total: float) -> bool:
    """Train the rest of epoch `at.epoch` (from the loader position when resuming inside it), logging every
    `log_every` steps and checkpointing every `checkpoint_every`. True when the epoch ran to its end; False when it
    stopped at `total` steps or a signal inside it."""
    cfg = run.cfg
    assert at.health is not None  # fit sets it before the first epoch
    train_loader.set_epoch(at.epoch)
    resuming = at.loader is not None and at.loader.epoch == at.epoch
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
        if at.step == 0 and run.board.enabled:  # a fresh start: what the run is and what it sees
            run.board.started(run.spec.to_json(), images, run.spec.pixels.mean)
        masks = dropout_masks(run.model, cfg.seed, at.step, run.rows, cfg.batch_size)
        loss, mistakes = train_step(step_fn, run.optimizer, images, labels, cfg.amp, masks)
        at.health.note(loss)  # on the device: no sync per step
        count_mistakes(at, mistakes, len(labels))
        at.step += 1
        seen += cfg.batch_size
        if at.step % cfg.log_every == 0 or at.step == total:
            log_step(run, at, loss, seen, time.perf_counter() - t_last, total)
            t_last, seen = time.perf_counter(), 0
        end_of_epoch = at.step % steps_per_epoch == 0  # checkpointed by end_of_epoch, after validation
        at.stopped = run.stop.at_step() if run.stop else None  # sync: none; reads last step's async all-reduce
        if not end_of_epoch and (at.step % cfg.checkpoint_every == 0 or at.step >= total or at.stopped):
            save(run, at, train_loader.state_dict())
        if (at.step >= total or at.stopped) and not end_of_epoch:
            return False
        run.speed.fetch_started()
    return True


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


def log_step(run: Run, at: Position, loss: torch.Tensor, images: int, elapsed: float, total: float) -> None:
    """A metrics line: the global batch's loss (the mean over ranks), images/s over every rank, the speed fields;
    a loss that is not finite (here or at an earlier step) ends the run."""
    check_health(run, at)  # sync: every rank's first bad step (an all-reduce), once a log interval
    if run.place.distributed:
        import torch.distributed as dist

        loss = loss.clone()
        dist.all_reduce(loss)  # sync: the global batch's loss
        loss /= run.place.world_size
    loss_value = loss.item()  # sync: the host waits for the step
    at.epoch_losses.append(loss_value)
    record = StepRecord(step=at.step, epoch=at.epoch, loss=round(loss_value, 6),
                        lr=run.optimizer.param_groups[0]["lr"], images_per_s=round(images / elapsed, 1),
                        **asdict(run.speed.fields(images / run.place.world_size / elapsed)),
                        time=round(time.time(), 3))
    if run.main_rank:
        append_metrics(run.metrics, record)
        run.board.step(record)
    run.progress.on_step(at.step, total, record)


def end_of_epoch(run: Run, val_loader, at: Position) -> None:
    """Validate, let the plateau rule see the val error, log the epoch and checkpoint the start of the next one."""
    check_health(run, at)  # sync: as in log_step
    val = validate(run.model, val_loader, run.cfg.amp, run.place)
    schedule = schedule_epoch(run.scheduler, run.optimizer, val.top1_error, run.spec.val_classes)
    losses = at.epoch_losses
    record = EpochRecord(epoch=at.epoch, step=at.step, val_top1_error=val.top1_error,
                         val_top5_error=val.top5_error, val_samples=val.samples,
                         lr=run.optimizer.param_groups[0]["lr"],
                         train_loss=round(float(np.mean(losses)), 6) if losses else None,
                         train_top1_error=train_top1_error(at, run.place), **asdict(schedule),
                         not_learning=True if at.epoch >= 1 and flat_loss(losses, run.spec.model.num_classes)
                         else None, time=round(time.time(), 3))
    if run.main_rank:
        append_metrics(run.metrics, record)
        run.board.epoch(record, run.model)
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
    save(run, at, LoaderPosition(at.epoch, 0))


@torch.no_grad()
def validate(model: torch.nn.Module, val_loader, amp: bool, place: Placement) -> Errors:
    """Centre-crop top-1/top-5 error over this rank's part of val, summed over ranks."""
    from pipeline.evaluate import class_probabilities, topk_correct

    probs, labels = class_probabilities(model, val_loader, amp)
    # sync: the counts to the host, then summed over ranks
    top1, top5, n = summed([topk_correct(probs, labels, 1).sum().item(), topk_correct(probs, labels, 5).sum().item(),
                            len(labels)], place)
    return Errors(1 - top1 / n, 1 - top5 / n, int(n))


def append_metrics(path: Path, record: StepRecord | EpochRecord) -> None:
    append_line(path, json.dumps(record.to_json()))
