"""Training: plain functions (step, optimizer, checkpoints) and one loop, `fit`, that resumes exactly.

A checkpoint is a plain dict (model, optimizer, scheduler, epoch, step, RNG states as tensors, loader position,
the losses logged so far in the epoch, config) loadable with `torch.load(weights_only=True)`, written atomically as
checkpoints/step-%09d.pt. Resuming restores the loader position and every RNG, so on the CPU a run killed mid-epoch
and resumed ends with the same weights and metrics as an uninterrupted one. SIGTERM/SIGUSR1 stop the run at a step
boundary with a checkpoint; a checkpoint belongs to the topology (world size, per-rank batch) that wrote it.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.artifacts import CHECKPOINTS_DIR, METRICS, EpochRecord, RunSpec, StepRecord, Topology
from pipeline.cache import append_line, atomic_write
from pipeline.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    newest_good_checkpoint,
    save_checkpoint,
)
from pipeline.cluster import Placement
from pipeline.config import AlexNetConfig, TrainConfig
from pipeline.errors import PipeError
from pipeline.model import build_model, count_parameters, forward_flops
from pipeline.record import append_event
from pipeline.runs import RunData
from pipeline.session import Session
from pipeline.speed import TrainingSpeed

# Slurm's preemption and time-limit warnings, and Ctrl-C: checkpoint at the next step boundary, then exit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
CHANCE_MARGIN = 1.5  # val top-1 error above 1 - CHANCE_MARGIN/K (K val classes) is chance level: nothing learnt yet
FLAT_LOSS = 0.01  # an epoch's mean train loss within 1% of ln(C): the net has not started learning


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
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

    on_step: Callable[[int, int, StepRecord], None] = lambda step, total, record: None
    on_epoch: Callable[[EpochRecord], None] = lambda record: None
    info: Callable[[str], None] = lambda message: None
    warn: Callable[[str], None] = lambda message: None


@dataclass
class Run:
    """What the steps of one training run share: the model, its optimizer and schedule, settings, folder, rank."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
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


@dataclass
class Position:
    """Where the loop is: the epoch, the global step, the loader position to resume inside the epoch (None: from
    its start), the losses logged so far in the epoch (for its mean train loss) and [top-1 mistakes, images] of
    the batches trained so far in it on this rank (for its train_top1_error)."""

    epoch: int = 0
    step: int = 0
    loader: dict | None = None
    epoch_losses: list = field(default_factory=list)
    stopped: str | None = None  # the signal that stopped the run (its checkpoint is written)
    resumed_from: str | None = None  # the checkpoint this start resumed from
    epoch_mistakes: list = field(default_factory=lambda: [0, 0])


class StopFlag:
    """SIGTERM/SIGUSR1/SIGINT only set a flag: the loop reads it at the next step boundary, where the ranks agree on
    it (all-reduced), so a signal during a step, validation or a checkpoint write lets that finish first. A second
    Ctrl-C quits at once, as Ctrl-C does elsewhere."""

    def __init__(self, announce: bool = True) -> None:
        self.signal: str | None = None
        self._announce = announce  # rank 0 says what Ctrl-C does; the others keep quiet
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

    def agreed(self, place: Placement) -> str | None:
        """The signal's name when any rank has received one, the same answer on every rank."""
        if not place.distributed:
            return self.signal
        import torch.distributed as dist

        received = torch.tensor([STOP_SIGNALS.index(signal.Signals[self.signal]) + 1 if self.signal else 0])
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        return STOP_SIGNALS[int(received) - 1].name if int(received) else None

    def restore(self) -> None:
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


def fit(model: torch.nn.Module, spec: RunSpec, train_loader, val_loader, out: Path, place: Placement,
        progress: Progress | None = None) -> Outcome:
    """Train until the spec's epochs, max_steps or a stop signal, resuming from the newest good checkpoint in
    out/checkpoints."""
    cfg = spec.train
    optimizer = make_optimizer(model, cfg)
    speed = TrainingSpeed(next(model.parameters()).device, forward_flops(spec.model), cfg.amp, cfg.peak_tflops)
    run = Run(model, optimizer, make_scheduler(optimizer, cfg), spec, place, out, progress or Progress(), speed)
    step_fn = wrap_model(model, cfg, place)
    # from here a signal is noted, not fatal: the run stops at its next step boundary
    run.stop = StopFlag(announce=run.main_rank)
    try:
        at = resume(run)
        total = min(cfg.epochs * len(train_loader), cfg.max_steps or math.inf)
        if run.main_rank:  # where this start or resume begins, and what it runs on
            append_event(out, event="resume" if at.resumed_from else "start", step=at.step, epoch=at.epoch,
                         total_steps=total, resumed_from=at.resumed_from,
                         world_size=place.world_size)
        while at.epoch < cfg.epochs and at.step < total and not at.stopped:
            if not train_epoch(run, step_fn, train_loader, at, total):
                break  # stopped inside the epoch (max_steps or a signal)
            end_of_epoch(run, val_loader, at)
            at.stopped = run.stop.agreed(place)  # a signal during validation: the epoch's checkpoint is written
    finally:
        run.stop.restore()
    return Outcome(at.epoch, at.step, str(latest_checkpoint(run.checkpoints)), at.stopped)


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
    """From the newest checkpoint that verifies (rank 0 chooses, damaged ones set aside): weights, optimizer,
    schedule, position and this rank's RNGs; metrics logged after it are dropped (they will be logged again).
    Without one: a fresh start, seeded, with an empty metrics.jsonl."""
    chosen = newest_good_checkpoint(run.checkpoints, run.progress.warn) if run.main_rank else None
    chosen = _broadcast(chosen, run.place)
    if chosen is None:
        seed_everything(run.cfg.seed * 1000 + run.place.rank)
        if run.main_rank:
            _truncate_metrics(run.metrics, -1)
        return Position()
    state = load_checkpoint(chosen)
    check_topology(RunSpec.of_checkpoint(state).topology, topology(run.cfg, run.place), chosen)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][run.place.rank])
    if run.main_rank:
        _truncate_metrics(run.metrics, state["step"])
        run.progress.info(f"train: resuming from step {state['step']}, epoch {state['epoch']} ({chosen})")
    mistakes = state.get("epoch_mistakes", [[0, 0]])
    rank = run.place.rank
    return Position(state["epoch"], state["step"], state["loader"], list(state.get("epoch_losses", [])),
                    epoch_mistakes=list(mistakes[rank] if rank < len(mistakes) else mistakes[0]),
                    resumed_from=str(chosen))


def topology(cfg: TrainConfig, place: Placement) -> Topology:
    """What the rank split of an epoch and the saved RNG states depend on."""
    return Topology(place.world_size, cfg.batch_size // place.world_size)


def check_topology(saved: Topology, now: Topology, path: Path) -> None:
    """A resume with another rank count would reuse some samples, skip others and hand ranks foreign RNG states:
    refused."""
    if saved != now:
        raise PipeError(f"{path} was written by {saved.world_size} process(es) of batch {saved.per_rank_batch}; "
                        f"this run has {now.world_size} of batch {now.per_rank_batch}; resume with "
                        f"{saved.world_size} process(es) (torchrun --nproc_per_node), or --force to start over")


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
    t_last, seen = time.perf_counter(), 0
    run.speed.fetch_started()
    for images, labels in train_loader:
        run.speed.fetch_done()
        loss, mistakes = train_step(step_fn, run.optimizer, images, labels, cfg.amp)
        count_mistakes(at, mistakes, len(labels))
        at.step += 1
        seen += per_rank_batch
        if at.step % cfg.log_every == 0 or at.step == total:
            loss_value = loss.item()
            at.epoch_losses.append(loss_value)
            elapsed = time.perf_counter() - t_last
            record = StepRecord(step=at.step, epoch=at.epoch, loss=round(loss_value, 6),
                                lr=run.optimizer.param_groups[0]["lr"],
                                images_per_s=round(seen * place.world_size / elapsed, 1),
                                **run.speed.fields(seen / elapsed), time=round(time.time(), 3))
            if run.main_rank:
                _append_metrics(run.metrics, record)
            run.progress.on_step(at.step, total, record)
            t_last, seen = time.perf_counter(), 0
        end_of_epoch = at.step % steps_per_epoch == 0  # checkpointed by end_of_epoch, after validation
        at.stopped = run.stop.agreed(place) if run.stop else None
        if not end_of_epoch and (at.step % cfg.checkpoint_every == 0 or at.step >= total or at.stopped):
            save(run, at, train_loader.state_dict())
        if (at.step >= total or at.stopped) and not end_of_epoch:
            return False
        run.speed.fetch_started()
    return True


def end_of_epoch(run: Run, val_loader, at: Position) -> None:
    """Validate, let the plateau rule see the val error, log the epoch and checkpoint the start of the next one."""
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
    for note in (record.lr_drop, record.lr_held):
        if note:
            run.progress.info(f"epoch {at.epoch}: {note}")
    if record.not_learning:
        run.progress.warn(f"epoch {at.epoch}: the training loss has stayed within {FLAT_LOSS:.0%} of "
                          f"ln({run.spec.model.num_classes}) for the whole epoch: the net has not started "
                          "learning (try --init default, a higher --lr, or check the labels)")
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
            "loader": loader_state, "epoch_losses": list(at.epoch_losses), "epoch_mistakes": mistakes,
            "config": run.spec.to_json()},
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


def _broadcast(value, place: Placement):
    """Rank 0's `value` on every rank."""
    if not place.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(state: dict, place: Placement) -> list[dict]:
    if not place.distributed:
        return [state]
    import torch.distributed as dist

    gathered: list = [None] * place.world_size
    dist.all_gather_object(gathered, state)
    return gathered


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

    net: torch.nn.Module
    train_loader: object
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

    torch.manual_seed(cfg.seed)
    net = build_model(model, session.devices)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    pixels = load_pca(data.pca_path).stats
    place = session.place
    common = {"crop": model.crop, "rank": place.rank, "world_size": place.world_size, "device": session.devices[0],
              "num_threads": cfg.loader_threads, "loader": cfg.loader}
    train_loader = make_train_loader(data.train_dir, pixels, cfg.batch_size // place.world_size, seed=cfg.seed,
                                     channels_last=cfg.channels_last, **cfg.augment, **common)
    val_loader = make_eval_loader(data.val_dir, pixels, cfg.eval_batch_size, ten_crop=False, **common)
    spec = RunSpec(model=model, train=cfg, pixels=pixels, classes=data.classes, inputs=data.digests,
                   val_classes=len(data.val.classes), topology=topology(cfg, place), devices=session.devices)
    return Job(net, train_loader, val_loader, spec, session)
