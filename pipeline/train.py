"""Training: plain functions (step, optimizer, checkpoints) and one loop, `fit`, that resumes exactly.

A checkpoint is a plain dict (model, optimizer, scheduler, epoch, step, RNG states as tensors, loader position,
the losses logged so far in the epoch, config) loadable with `torch.load(weights_only=True)`, written atomically as
checkpoints/step-%09d.pt. Resuming restores the loader position and every RNG, so on the CPU a run killed mid-epoch
and resumed ends with the same weights and metrics as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import atomic_write
from pipeline.cluster import Placement
from pipeline.config import AlexNetConfig, TrainConfig
from pipeline.model import forward_flops
from pipeline.speed import TrainingSpeed

CHECKPOINT_GLOB = "step-*.pt"


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
               labels: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """One SGD step on one batch; returns the (detached) mean cross-entropy loss."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels.to(logits.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


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


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.pt"


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob(CHECKPOINT_GLOB))
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Atomic write, then keep only the `keep` highest steps."""
    path = checkpoint_path(folder, step)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())
    for old in sorted(folder.glob(CHECKPOINT_GLOB))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class Progress:
    """What `fit` reports: called after every step with (step, total_steps, fields)."""

    on_step: Callable[[int, int, dict], None] = lambda step, total, fields: None
    on_epoch: Callable[[dict], None] = lambda record: None


def fit(model: torch.nn.Module, model_config: dict, cfg: TrainConfig, train_loader, val_loader, out: Path,
        place: Placement, progress: Progress | None = None, extra_config: dict | None = None) -> dict:
    """Train until `cfg.epochs` or `cfg.max_steps`, resuming from the highest checkpoint in out/checkpoints."""
    progress = progress or Progress()
    ckpt_dir, metrics_path = out / "checkpoints", out / "metrics.jsonl"
    main_rank = place.rank == 0
    optimizer, net = make_optimizer(model, cfg), model
    scheduler = make_scheduler(optimizer, cfg)
    if place.distributed:
        from torch.nn.parallel import DistributedDataParallel

        first = next(model.parameters()).device
        single = len({p.device for p in model.parameters()}) == 1 and first.type == "cuda"
        net = DistributedDataParallel(model, device_ids=[first] if single else None)
    step_fn = torch.compile(net) if cfg.compile else net

    epoch, step, position, resumed_losses = 0, 0, None, []
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = load_checkpoint(latest)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, step, position = state["epoch"], state["step"], state["loader"]
        resumed_losses = list(state.get("epoch_losses", []))  # for this epoch's mean train loss
        set_rng_state(state["rng"][place.rank] if place.rank < len(state["rng"]) else state["rng"][0])
        if main_rank:
            _truncate_metrics(metrics_path, step)
    else:
        seed_everything(cfg.seed * 1000 + place.rank)

    def checkpoint(next_epoch: int, loader_state: dict, epoch_losses: list[float]) -> None:
        rngs = _gather(rng_state(), place)
        if main_rank:
            save_checkpoint(ckpt_dir, step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": next_epoch, "step": step, "rng": rngs,
                "loader": loader_state, "epoch_losses": epoch_losses,
                "config": {"model": model_config, "train": asdict(cfg), **(extra_config or {})}}, cfg.keep_checkpoints)

    steps_per_epoch = len(train_loader)
    total = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    per_rank_batch = cfg.batch_size // place.world_size
    speed = TrainingSpeed(next(model.parameters()).device, forward_flops(AlexNetConfig.from_dict(model_config)),
                          cfg.amp)
    while epoch < cfg.epochs and step < total:
        train_loader.set_epoch(epoch)
        resuming = position is not None and position.get("epoch") == epoch
        if resuming:
            train_loader.load_state_dict(position)
        losses = resumed_losses if resuming else []  # the losses logged in this epoch so far
        position = None
        model.train()
        t_last, seen = time.perf_counter(), 0
        speed.fetch_started()
        for images, labels in train_loader:
            speed.fetch_done()
            loss = train_step(step_fn, optimizer, images, labels, cfg.amp)
            step += 1
            seen += per_rank_batch
            if step % cfg.log_every == 0 or step == total:
                loss_value = loss.item()
                losses.append(loss_value)
                elapsed = time.perf_counter() - t_last
                record = {"step": step, "epoch": epoch, "loss": round(loss_value, 6),
                          "lr": optimizer.param_groups[0]["lr"],
                          "images_per_s": round(seen * place.world_size / elapsed, 1),
                          **speed.fields(seen / elapsed)}
                if main_rank:
                    _append_metrics(metrics_path, record)
                progress.on_step(step, total, record)
                t_last, seen = time.perf_counter(), 0
            end_of_epoch = step % steps_per_epoch == 0  # handled below, after validation
            if not end_of_epoch and (step % cfg.checkpoint_every == 0 or step >= total):
                checkpoint(epoch, train_loader.state_dict(), losses)
            if step >= total and not end_of_epoch:
                break
            speed.fetch_started()
        else:  # the epoch ran to its end: validate, maybe drop the lr, checkpoint
            val = validate(model, val_loader, cfg.amp, place)
            scheduler.step(val["top1_error"])
            record = {"epoch": epoch, "step": step, "val_top1_error": val["top1_error"],
                      "val_top5_error": val["top5_error"], "val_samples": val["samples"],
                      "train_loss": round(float(np.mean(losses)), 6) if losses else None,
                      "lr": optimizer.param_groups[0]["lr"]}
            if main_rank:
                _append_metrics(metrics_path, record)
            progress.on_epoch(record)
            epoch += 1
            checkpoint(epoch, {"epoch": epoch, "batches": 0}, [])
            continue
        break
    return {"epoch": epoch, "step": step, "checkpoint": str(latest_checkpoint(ckpt_dir))}


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
