"""Benchmark what TensorBoard events cost a training step: the real step (`pipeline.train.loop.train_step`) of the
demo's net on a fixed random batch, with the run's writes at the run's cadence (`TrainingBoard`: a step's scalars
every --log-every steps, flushed; the epoch's scalars, conv1 per tower and every parameter's norms every
--steps-per-epoch steps; the settings and the input grid once), events on against events off, the blocks
interleaved. Two figures: the wall time per step on vs off (what a run sees, with the machine's noise) and the time
spent inside the writes per step (the cost itself). The goal: at most 3 % of a step.

    python bench/events.py [--device cpu|cuda:0] [--blocks N] [--steps N] [--log-every N] [--steps-per-epoch N]
                           [--width W] [--batch B]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.board import TrainingBoard
from pipeline.config import TrainConfig
from pipeline.model import AlexNetConfig, initial_model
from pipeline.records import EpochRecord, StepRecord
from pipeline.train.loop import train_step
from pipeline.train.schedule import make_optimizer


def block(model, optimizer, batch, board: TrainingBoard, args: argparse.Namespace, start: int,
          writes: dict[str, list[float]]) -> float:
    """`args.steps` steps from global step `start`: the wall seconds; the seconds of each write go to `writes`."""
    images, labels = batch
    t0 = time.perf_counter()
    for step in range(start + 1, start + args.steps + 1):
        loss, _ = train_step(model, optimizer, images, labels)
        if step % args.log_every == 0:
            value = loss.item()  # the sync a logged step makes with events on or off
            w0 = time.perf_counter()
            board.step(StepRecord(step=step, epoch=0, loss=value, lr=0.003, images_per_s=1.0, data_wait=0.0,
                                  step_ms=1.0))
            writes["step"].append(time.perf_counter() - w0)
        if step % args.steps_per_epoch == 0:
            w0 = time.perf_counter()
            board.epoch(EpochRecord(epoch=step // args.steps_per_epoch, step=step, val_top1_error=0.5,
                                    val_top5_error=0.2, val_samples=100, lr=0.003, train_loss=1.0,
                                    train_top1_error=0.4), model)
            writes["epoch"].append(time.perf_counter() - w0)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=3, help="timed blocks per mode, interleaved (off, on, off, …)")
    ap.add_argument("--steps", type=int, default=20, help="steps per block")
    ap.add_argument("--log-every", type=int, default=TrainConfig().log_every)
    ap.add_argument("--steps-per-epoch", type=int, default=18, help="the demo's 600 images / batch 32")
    ap.add_argument("--width", type=float, default=0.25, help="the demo's net")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    config = AlexNetConfig(width=args.width, init="default", num_classes=10)
    model = initial_model(config, 0, [args.device]).train()
    optimizer = make_optimizer(model, TrainConfig(lr=0.003))
    images = 50 * torch.randn(args.batch, 3, config.crop, config.crop, device=args.device)
    batch = images, torch.randint(0, 10, (args.batch,), device=args.device)
    walls: dict[str, list[float]] = {"off": [], "on": []}
    writes: dict[str, list[float]] = {"step": [], "epoch": []}
    with tempfile.TemporaryDirectory() as tmp:
        boards = {"off": TrainingBoard.off(), "on": TrainingBoard.of_run(Path(tmp), None, print, enabled=True)}
        w0 = time.perf_counter()
        boards["on"].started({"bench": vars(args)}, images, (0.5, 0.5, 0.5))
        started = time.perf_counter() - w0
        unused: dict[str, list[float]] = {"step": [], "epoch": []}  # the off board's no-op calls
        block(model, optimizer, batch, boards["off"], args, 0, unused)  # warm-up: allocator, first-call costs
        for i in range(args.blocks):
            for mode in ("off", "on"):
                walls[mode].append(block(model, optimizer, batch, boards[mode], args, (2 * i + 1) * args.steps,
                                         writes if mode == "on" else unused) / args.steps)
        boards["on"].close()
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    off, on = statistics.median(walls["off"]), statistics.median(walls["on"])
    step_write, epoch_write = statistics.median(writes["step"]), statistics.median(writes["epoch"])
    wrote = step_write / args.log_every + epoch_write / args.steps_per_epoch  # a step's share at the run's cadence
    row = {"device": args.device, "width": args.width, "batch": args.batch, "log_every": args.log_every,
           "steps_per_epoch": args.steps_per_epoch, "step_ms_off": round(1000 * off, 2),
           "step_ms_on": round(1000 * on, 2), "wall_overhead": round(on / off - 1, 4),
           "step_write_ms": round(1000 * step_write, 3), "epoch_write_ms": round(1000 * epoch_write, 1),
           "writes_ms_per_step": round(1000 * wrote, 3), "writes_share": round(wrote / off, 5),
           "start_ms": round(1000 * started, 1), "events_bytes": size}
    print(f"TensorBoard events, {args.device}, width {args.width}, batch {args.batch}: log every {args.log_every} "
          f"steps, an epoch every {args.steps_per_epoch}; medians of {args.blocks} interleaved blocks of "
          f"{args.steps} steps")
    print(f"  step, events off   {row['step_ms_off']:9.2f} ms")
    print(f"  step, events on    {row['step_ms_on']:9.2f} ms   ({row['wall_overhead']:+.1%} wall, machine noise "
          "included)")
    print(f"  a step's write     {row['step_write_ms']:9.3f} ms (every {args.log_every} steps, flushed)")
    print(f"  an epoch's write   {row['epoch_write_ms']:9.1f} ms (conv1 images, every parameter's norms)")
    print(f"  inside the writes  {row['writes_ms_per_step']:9.3f} ms a step ({row['writes_share']:.2%} of a step; "
          "goal ≤ 3%)")
    print(f"  once at the start  {row['start_ms']:9.1f} ms (settings and the input grid)")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
