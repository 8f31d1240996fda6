"""Benchmark `train`: training-step images/s of the two-tower AlexNet on one device, side by side with the
same net written as one `groups=2` column (Caffe's formulation) and torchvision's AlexNet (a different
one-column model, for context). Same batch, warm-up and timed steps for each, the timed steps interleaved;
a synthetic batch, so no data loading is measured.

    python bench/train.py [--steps N] [--warmup N] [--batch B] [--width W] [--device cpu|cuda:0]
                          [--channels-last] [--amp] [--compile] [--tf32|--no-tf32] [--models two-tower,grouped,...]

On a GPU, fp32 steps run their convolutions in TF32 unless --no-tf32 (torch's default: cuDNN allows TF32); each row
says which arithmetic it used (`precision`).

Prints a table and one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.model import AlexNetConfig, build_model, count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the grouped twin lives beside its tests
from alexnet_grouped import AlexNetGrouped  # noqa: E402

from pipeline.train.speed import precision, set_tf32

MODELS = ("two-tower", "grouped", "torchvision")


def models(config: AlexNetConfig, device: str, names: list[str]) -> dict[str, nn.Module]:
    make = {
        "two-tower": lambda: build_model(config, [device]),
        "grouped": lambda: AlexNetGrouped(config).to(device),
        "torchvision": lambda: torchvision.models.alexnet(num_classes=config.num_classes).to(device),
    }
    return {name: make[name]() for name in names}


def train_step(model: nn.Module, args: argparse.Namespace) -> Callable[[], None]:
    """One SGD step as in the paper (momentum 0.9, weight decay 5e-4, lr 0.01) on a fixed random batch."""
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    forward = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def images_per_s(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, float]:
    """batch / median step time. Timed steps run round-robin, the order rotating each round, so drift over
    the run (clocks, other processes, the allocator) falls on every model alike; the median ignores one-off
    stalls."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(args.steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            started = time.perf_counter()
            steps[name]()
            seconds[name].append(time.perf_counter() - started)
    return {name: args.batch / statistics.median(s) for name, s in seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per model")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, cuDNN autotune)")
    ap.add_argument("--batch", type=int, default=32, help="images per step (the paper: 128)")
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the paper's nets)")
    ap.add_argument("--crop", type=int, default=224, choices=[224, 227])
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--device", default="cpu", help="one device, e.g. cpu or cuda:0")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model")
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                    help="TF32 in convolutions and matmuls on a GPU (default: torch's, convolutions only)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    args = ap.parse_args()
    names = [m for m in args.models.split(",") if m]
    if not names or set(names) - set(MODELS):
        ap.error(f"--models takes a comma list of {', '.join(MODELS)}, got {args.models!r}")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    if args.tf32 is not None:
        set_tf32(args.tf32)

    config = AlexNetConfig(num_classes=args.num_classes, width=args.width, crop=args.crop)
    setting = {"device": args.device, "batch": args.batch, "width": args.width, "crop": args.crop,
               "warmup": args.warmup, "steps": args.steps, "channels_last": args.channels_last,
               "amp": args.amp, "compile": args.compile, "threads": torch.get_num_threads(),
               "precision": precision(torch.device(args.device), args.amp)}
    print(f"train step, {args.batch} images of {args.crop}x{args.crop}, width {args.width}, {args.device}, "
          f"{setting['precision']}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    nets = models(config, args.device, names)
    rates = images_per_s({name: train_step(net, args) for name, net in nets.items()}, args)
    rows = [{"bench": "train", "model": name, "images_per_s": round(rates[name], 2),
             "parameters": count_parameters(net), **setting} for name, net in nets.items()]
    base = rows[0]["images_per_s"]
    print(f"{'model':<14}{'parameters':>14}{'images/s':>12}{'vs two-tower':>15}")
    for row in rows:
        print(f"{row['model']:<14}{row['parameters']:>14,}{row['images_per_s']:>12.1f}"
              f"{row['images_per_s'] / base:>14.2f}x")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
