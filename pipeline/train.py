"""Training: plain functions (step, optimizer, checkpoints) and one loop, `fit`, that resumes exactly.

A checkpoint is a plain dict (model, optimizer, scheduler, epoch, step, RNG states as tensors, loader position,
the losses logged so far in the epoch, config) loadable with `torch.load(weights_only=True)`, written atomically as
checkpoints/step-%09d.pt. Resuming restores the loader position and every RNG, so on the CPU a run killed mid-epoch
and resumed ends with the same weights and metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import atomic_write
from pipeline.checkpoints import CHECKPOINTS_DIR, latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.cluster import Placement
from pipeline.config import TrainConfig

METRICS = "metrics.jsonl"  # inside a run folder: one line per logged step and per epoch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=cfg.lr_patience, min_lr=cfg.lr * 0.1**cfg.lr_drops * 0.999)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on one batch; returns the (detached) mean cross-entropy loss and the number of top-1 mistakes
    of the logits it trained on (the training error, with no extra pass)."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(images)
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(dim=1) != labels).sum()


# ---------------------------------------------------------------------------------------------------------------
# RNG states (saved in every checkpoint)


def rng_state() -> dict:
    """Every RNG as tensors/plain types (so `weights_only=True` can load it)."""
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(_numpy_state()),
             "python": torch.tensor(list(_python_state()), dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _numpy_state() -> np.ndarray:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return np.concatenate([keys.astype(np.int64), [pos, has_gauss], np.frombuffer(np.float64(cached).tobytes(),
                                                                                   np.int64)])


def _python_state() -> tuple[int, ...]:
    version, internal, gauss = random.getstate()
    return (version, *internal, 0 if gauss is None else 1, np.float64(gauss or 0).view(np.int64).item())


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"].numpy()
    np.random.set_state(("MT19937", n[:624].astype(np.uint32), int(n[624]), int(n[625]),
                         float(np.int64(n[626]).view(np.float64))))
    p = state["python"].tolist()
    version, internal, has_gauss, gauss = p[0], tuple(p[1:-2]), p[-2], np.int64(p[-1]).view(np.float64).item()
    random.setstate((version, internal, gauss if has_gauss else None))
    if "cuda" in state and torch.cuda.is_available():  # a resume may see fewer GPUs than the run that saved
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ---------------------------------------------------------------------------------------------------------------
# the loop: `fit` over named steps (resume, one epoch, the end of an epoch)


@dataclass
class Progress:
    """What `fit` reports: called after every step with (step, total_steps, fields)."""

    on_step: Callable[[int, int, dict], None] = lambda step, total, fields: None
    on_epoch: Callable[[dict], None] = lambda record: None


@dataclass
class Run:
    """What the steps of one training run share: the model, its optimizer and schedule, settings, folder, rank."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    cfg: TrainConfig
    place: Placement
    out: Path
    config: dict  # stored in each checkpoint: {"model": …, "train": …, **extra}
    progress: Progress

    @property
    def main_rank(self) -> bool:
        return self.place.rank == 0

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINTS_DIR

    @property
    def metrics(self) -> Path:
        return self.out / METRICS


@dataclass
class Position:
    """Where the loop is: the epoch, the global step, the loader position to resume inside the epoch (None: from
    its start), the losses logged so far in the epoch (for its mean train loss) and [top-1 mistakes, images] of
    the batches trained so far in it on this rank (for its train_top1_error)."""

    epoch: int = 0
    step: int = 0
    loader: dict | None = None
    epoch_losses: list = field(default_factory=list)
    epoch_mistakes: list = field(default_factory=lambda: [0, 0])


def fit(model: torch.nn.Module, model_config: dict, cfg: TrainConfig, train_loader, val_loader, out: Path,
        place: Placement, progress: Progress | None = None, extra_config: dict | None = None) -> dict:
    """Train until `cfg.epochs` or `cfg.max_steps`, resuming from the highest checkpoint in out/checkpoints."""
    optimizer = make_optimizer(model, cfg)
    run = Run(model, optimizer, make_scheduler(optimizer, cfg), cfg, place, out,
              {"model": model_config, "train": asdict(cfg), **(extra_config or {})}, progress or Progress())
    step_fn = wrap_model(model, cfg, place)
    at = resume(run)
    total = min(cfg.epochs * len(train_loader), cfg.max_steps or math.inf)
    while at.epoch < cfg.epochs and at.step < total:
        if not train_epoch(run, step_fn, train_loader, at, total):
            break  # stopped inside the epoch (max_steps)
        end_of_epoch(run, val_loader, at)
    return {"epoch": at.epoch, "step": at.step, "checkpoint": str(latest_checkpoint(run.checkpoints))}


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, place: Placement):
    """What a step calls: the model, in DDP across ranks, compiled when asked."""
    net = model
    if place.distributed:
        from torch.nn.parallel import DistributedDataParallel

        first = next(model.parameters()).device
        single = len({p.device for p in model.parameters()}) == 1 and first.type == "cuda"
        net = DistributedDataParallel(model, device_ids=[first] if single else None)
    return torch.compile(net) if cfg.compile else net


def resume(run: Run) -> Position:
    """From the highest checkpoint: weights, optimizer, schedule, position and this rank's RNGs; metrics logged after
    it are dropped (they will be logged again). Without one: a fresh start, seeded."""
    latest = latest_checkpoint(run.checkpoints)
    if latest is None:
        seed_everything(run.cfg.seed * 1000 + run.place.rank)
        return Position()
    state = load_checkpoint(latest)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    rank = run.place.rank
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    if run.main_rank:
        _truncate_metrics(run.metrics, state["step"])
    mistakes = state.get("epoch_mistakes", [[0, 0]])
    return Position(state["epoch"], state["step"], state["loader"], list(state.get("epoch_losses", [])),
                    list(mistakes[rank] if rank < len(mistakes) else mistakes[0]))


def train_epoch(run: Run, step_fn, train_loader, at: Position, total: float) -> bool:
    """Train the rest of epoch `at.epoch` (from the loader position when resuming inside it), logging every
    `log_every` steps and checkpointing every `checkpoint_every`. True when the epoch ran to its end; False when it
    stopped at `total` steps inside it."""
    cfg, place = run.cfg, run.place
    train_loader.set_epoch(at.epoch)
    resuming = at.loader is not None and at.loader.get("epoch") == at.epoch
    if resuming:
        train_loader.load_state_dict(at.loader)
    if not resuming:
        at.epoch_losses, at.epoch_mistakes = [], [0, 0]
    at.loader = None
    steps_per_epoch, per_rank_batch = len(train_loader), cfg.batch_size // place.world_size
    run.model.train()
    waited, t_last, seen = 0.0, time.perf_counter(), 0
    t_fetch = time.perf_counter()
    for images, labels in train_loader:
        waited += time.perf_counter() - t_fetch
        loss, mistakes = train_step(step_fn, run.optimizer, images, labels, cfg.amp)
        count_mistakes(at, mistakes, len(labels))
        at.step += 1
        seen += per_rank_batch
        if at.step % cfg.log_every == 0 or at.step == total:
            loss_value = loss.item()
            at.epoch_losses.append(loss_value)
            elapsed = time.perf_counter() - t_last
            record = {"step": at.step, "epoch": at.epoch, "loss": round(loss_value, 6),
                      "lr": run.optimizer.param_groups[0]["lr"],
                      "images_per_s": round(seen * place.world_size / elapsed, 1),
                      "data_wait": round(waited / elapsed, 4)}
            if run.main_rank:
                _append_metrics(run.metrics, record)
            run.progress.on_step(at.step, total, record)
            waited, t_last, seen = 0.0, time.perf_counter(), 0
        end_of_epoch = at.step % steps_per_epoch == 0  # checkpointed by end_of_epoch, after validation
        if not end_of_epoch and (at.step % cfg.checkpoint_every == 0 or at.step >= total):
            save(run, at, train_loader.state_dict())
        if at.step >= total and not end_of_epoch:
            return False
        t_fetch = time.perf_counter()
    return True


def end_of_epoch(run: Run, val_loader, at: Position) -> None:
    """Validate, let the plateau rule see the val error, log the epoch and checkpoint the start of the next one."""
    val = validate(run.model, val_loader, run.cfg.amp, run.place)
    run.scheduler.step(val["top1_error"])
    losses = at.epoch_losses
    record = {"epoch": at.epoch, "step": at.step, "val_top1_error": val["top1_error"],
              "val_top5_error": val["top5_error"], "val_samples": val["samples"],
              "train_loss": round(float(np.mean(losses)), 6) if losses else None,
              "train_top1_error": train_top1_error(at, run.place),
              "lr": run.optimizer.param_groups[0]["lr"]}
    if run.main_rank:
        _append_metrics(run.metrics, record)
    run.progress.on_epoch(record)
    at.epoch += 1
    at.epoch_losses, at.epoch_mistakes = [], [0, 0]
    save(run, at, {"epoch": at.epoch, "batches": 0})


def save(run: Run, at: Position, loader_state: dict) -> None:
    """A checkpoint of the run at `at` (every rank's RNGs gathered; rank 0 writes)."""
    rngs = _gather(rng_state(), run.place)
    mistakes = _gather([int(n) for n in at.epoch_mistakes], run.place)  # every rank: a collective
    if run.main_rank:
        save_checkpoint(run.checkpoints, at.step, {
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "epoch": at.epoch, "step": at.step, "rng": rngs,
            "loader": loader_state, "epoch_losses": list(at.epoch_losses),
            "epoch_mistakes": mistakes, "config": run.config},
            run.cfg.keep_checkpoints)


def count_mistakes(at: Position, mistakes: torch.Tensor, images: int) -> None:
    """Add a batch's top-1 mistakes to the epoch's (kept as a tensor on the device: no sync per step)."""
    at.epoch_mistakes = [at.epoch_mistakes[0] + mistakes, at.epoch_mistakes[1] + images]


def train_top1_error(at: Position, place: Placement) -> float | None:
    """The epoch's top-1 error on its training batches as they were trained (augmented, dropout on), over ranks."""
    counts = torch.tensor([float(at.epoch_mistakes[0]), float(at.epoch_mistakes[1])], dtype=torch.float64)
    if place.distributed:
        import torch.distributed as dist

        dist.all_reduce(counts)
    wrong, seen = counts.tolist()
    return round(wrong / seen, 6) if seen else None


@torch.no_grad()
def validate(model: torch.nn.Module, val_loader, amp: bool, place: Placement) -> dict:
    """Centre-crop top-1/top-5 error over this rank's part of val, summed over ranks."""
    from pipeline.evaluate import predict, topk_correct

    probs, labels = predict(model, val_loader, amp)
    counts = torch.tensor([topk_correct(probs, labels, 1).sum().item(), topk_correct(probs, labels, 5).sum().item(),
                           len(labels)], dtype=torch.float64)
    if place.distributed:
        import torch.distributed as dist

        dist.all_reduce(counts)
    top1, top5, n = counts.tolist()
    return {"top1_error": 1 - top1 / n, "top5_error": 1 - top5 / n, "samples": int(n)}


def _gather(state: dict, place: Placement) -> list[dict]:
    if not place.distributed:
        return [state]
    import torch.distributed as dist

    gathered: list = [None] * place.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in keep))
