"""What ends a run early: a loss or weight that is not finite (`Health`, `check_health`: the run is recorded as
diverged, its last finite checkpoint kept), a stop signal (`StopFlag`: checkpoint at the next step boundary, then
exit), and the warning that a net has not started learning (`flat_loss`)."""

from __future__ import annotations

import math
import os
import signal
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.cluster import Placement
from pipeline.engine import write_json
from pipeline.errors import Diverged
from pipeline.record import append_event
from pipeline.records import DIVERGED, DivergedAt
from pipeline.train.checkpoints import latest_checkpoint

if TYPE_CHECKING:
    from pipeline.train.loop import Run
    from pipeline.train.state import Position

# Slurm's preemption and time-limit warnings, and Ctrl-C: checkpoint at the next step boundary, then exit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FLAT_LOSS = 0.01  # an epoch's mean train loss within 1% of ln(C): the net has not started learning


def flat_loss(losses: list[float], num_classes: int) -> bool:
    """An epoch's mean logged loss within FLAT_LOSS of ln(C): the net still outputs uniform guesses (the mean,
    because one small batch's loss is noisy)."""
    chance = math.log(num_classes)
    return bool(losses) and abs(float(np.mean(losses)) - chance) <= FLAT_LOSS * chance


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
        write_json(run.out / DIVERGED, DivergedAt(first_bad, at.step, last.name if last else None).to_json())
        append_event(run.out, "diverged", step=first_bad, epoch=at.epoch)
    kept = f"the last finite checkpoint, {last}, is kept" if last else "no checkpoint was written"
    raise Diverged(f"train: diverged: {said} at step {first_bad} (seen at step {at.step}); {kept}; "
                   "rerun with a lower --lr and --force", step=first_bad)
