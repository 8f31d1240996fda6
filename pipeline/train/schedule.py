"""The optimizer and the learning-rate schedule (§5: SGD with momentum, lr/10 when the val error stops improving)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import TrainConfig

CHANCE_MARGIN = 1.5  # val top-1 error above 1 - CHANCE_MARGIN/K (K val classes) is chance level: nothing learnt yet


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


@dataclass(frozen=True)
class ScheduleNote:
    """What the schedule did at an epoch's end, in words, for the epoch's record (both None: nothing)."""

    lr_drop: str | None = None
    lr_held: str | None = None


def schedule_epoch(scheduler, optimizer: torch.optim.Optimizer, top1_error: float, val_classes: int) -> ScheduleNote:
    """Let the schedule see one epoch's val error; what it did, for the epoch's record: the plateau rule is not
    shown an error at chance level (a slow start is not a plateau: §5's init keeps the loss at ln C for epochs)."""
    before = optimizer.param_groups[0]["lr"]
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if at_chance(top1_error, val_classes):
            return ScheduleNote(lr_held=f"val top-1 error {top1_error:.4f} is at chance level for {val_classes} "
                                        "classes")
        scheduler.step(top1_error)
        reason = f"val top-1 error has not improved on {scheduler.best:.4f} for {scheduler.patience + 1} epochs"
    else:
        scheduler.step()
        reason = f"step schedule: epoch {scheduler.last_epoch} is a milestone"
    after = optimizer.param_groups[0]["lr"]
    return ScheduleNote(lr_drop=f"lr {before:g} → {after:g}: {reason}") if after < before else ScheduleNote()
