"""Figure 1's net and one run of it: cuda-convnet's CIFAR-10 example (`layers-18pct.cfg`, the authors' own code),
three 5×5 conv layers of 32, 32 and 64 maps, each followed by the neuron and a 3×3 stride-2 pool (max, average,
average), and one fully connected layer to the ten classes; trained with SGD and momentum, no regularisation of any
kind, until it reaches the threshold, falls behind the best run, diverges or hits the cap. A run resumes after any
finished epoch and ends exactly as if it had not stopped."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pipeline.records import EpochProgress, Figure1Run, Part, build, to_plain

# cuda-convnet prints the training error once per data batch file, and CIFAR-10's training set is five of them
PARTS_PER_EPOCH = 5


# The inits: the weights' standard deviations (conv1, conv2, conv3, fc), biases 0, and the pixel scale they are
# meant for. cuda-convnet: its example net's `initW` (layers-18pct.cfg) on pixels 0..255 minus the mean, as §2
# feeds them; imagenet: §5's N(0, 0.01) for every layer, on the same pixels; torch: PyTorch's own init
# (reset_parameters) on pixels scaled to 0..1, as most PyTorch code has it.
INITS = {"cuda-convnet": (1e-4, 1e-2, 1e-2, 1e-2), "imagenet": (1e-2,) * 4, "torch": None}


PIXEL_SCALE = {"cuda-convnet": 1.0, "imagenet": 1.0, "torch": 1 / 255}


@dataclass(frozen=True)
class Setup:
    """Everything both nets share; the stage's cache key holds all of it (`to_plain(setup)`)."""

    lrs: tuple[float, ...]
    epochs: int  # the cap
    seeds: int = 2
    threshold: float = 0.25
    init: str = "cuda-convnet"
    batch_size: int = 128
    momentum: float = 0.9


def four_layer_net(activation: str, init: str, seed: int):
    """cuda-convnet's CIFAR-10 net with `activation` after every conv layer and nothing else different: the same
    seed gives both activations the same initial weights. Without its two response-normalisation layers: those
    are spatial (cuda-convnet's `rnorm`, not §3.3's across maps) and scale by the activities' size, which tanh
    bounds and ReLU does not, so they would be a second difference between the two curves."""
    import torch
    from torch import nn

    neuron = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    net = nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), neuron(), nn.MaxPool2d(3, 2, ceil_mode=True),  # 32 → 16
        nn.Conv2d(32, 32, 5, padding=2), neuron(), nn.AvgPool2d(3, 2, ceil_mode=True),  # → 8
        nn.Conv2d(32, 64, 5, padding=2), neuron(), nn.AvgPool2d(3, 2, ceil_mode=True),  # → 4
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10))
    generator = torch.Generator().manual_seed(seed)
    layers = [m for m in net if isinstance(m, nn.Conv2d | nn.Linear)]
    stds = INITS[init]
    for i, layer in enumerate(layers):
        assert layer.bias is not None  # every layer above has one
        if stds is not None:
            nn.init.normal_(layer.weight, 0.0, stds[i], generator=generator)
            nn.init.zeros_(layer.bias)
        else:  # what reset_parameters() does, from this generator
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(layer.weight[0].numel())
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return net


@dataclass(frozen=True)
class Run:
    activation: str
    lr: float
    seed: int
    stop_after_images: int | None = None  # the best run so far reached the threshold here

    @property
    def name(self) -> str:
        return f"{self.activation}-lr{self.lr:g}-seed{self.seed}"


def epoch_order(n: int, seed: int, epoch: int):
    """The epoch's sample order, from (seed, epoch) alone: a resumed run trains the same batches."""
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n)


def part_ends(batches: int) -> list[int]:
    """The batch counts at which each fifth of an epoch ends (fewer parts when there are fewer batches)."""
    parts = min(PARTS_PER_EPOCH, batches)
    return [round(k * batches / parts) for k in range(1, parts + 1)]


@dataclass
class RunCheckpoint:
    """A run after a finished epoch it goes on from: weights, optimizer, and its progress so far. On disk a plain
    dict (runs/<run>.pt) that `torch.load(weights_only=True)` reads."""

    run: Run
    epoch: int
    model: dict  # torch's state dicts
    optimizer: dict
    parts: list[Part]
    epochs: list[EpochProgress]

    @classmethod
    def from_state(cls, state: dict) -> RunCheckpoint:
        progress = state["progress"]
        return cls(Run(**state["run"]), state["epoch"], state["model"], state["optimizer"],
                   list(build(tuple[Part, ...], progress["parts"])),
                   list(build(tuple[EpochProgress, ...], progress["epochs"])))

    def to_state(self) -> dict:
        return {"run": asdict(self.run), "epoch": self.epoch, "model": self.model, "optimizer": self.optimizer,
                "progress": {"parts": to_plain(self.parts), "epochs": to_plain(self.epochs)}}


def train_run(run: Run, setup: Setup, images, labels, mean, *, state: RunCheckpoint | None = None,
              on_epoch: Callable[[RunCheckpoint], None] | None = None) -> Figure1Run:
    """Train one net with SGD + momentum until it reaches the threshold, falls behind the best, diverges or hits the
    cap; returns its record. `images` uint8 (N, 3, 32, 32) and `labels` on the device; `mean` the per-channel pixel
    mean. `on_epoch` gets the run's checkpoint after every finished epoch it goes on from; given back as `state`,
    the run resumes there and ends exactly as if it had not stopped."""
    import torch

    device = images.device
    net = four_layer_net(run.activation, setup.init, run.seed).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=run.lr, momentum=setup.momentum)
    parts: list[Part] = []
    epochs: list[EpochProgress] = []
    first = 1
    if state is not None:
        net.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        parts, epochs, first = list(state.parts), list(state.epochs), state.epoch + 1
    shift = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    batches = len(labels) // setup.batch_size  # the last partial batch is dropped: every step the same size
    end = None
    for epoch in range(first, setup.epochs + 1):
        new_parts, progress = _train_epoch(net, optimizer, images, labels, shift, setup, run, epoch, batches,
                                           parts[-1].images if parts else 0)
        parts += new_parts
        epochs.append(progress)
        end = _end_of(parts[-1], setup.threshold, run.stop_after_images) if new_parts else None
        if end:
            break
        if on_epoch is not None and epoch < setup.epochs:
            on_epoch(RunCheckpoint(run, epoch, net.state_dict(), optimizer.state_dict(), list(parts), list(epochs)))
    return run_record(run, batches * setup.batch_size, parts, epochs, end or "cap")


def _train_epoch(net, optimizer, images, labels, shift, setup: Setup, run: Run, epoch: int, batches: int,
                 seen: int) -> tuple[list[Part], EpochProgress]:
    """One epoch in (seed, epoch)'s order: a `Part` per fifth, and the epoch's error and mean loss over the fifths
    it trained (it ends early at the fifth that ends the run)."""
    import torch
    from torch.nn.functional import cross_entropy

    started = time.perf_counter()
    device = images.device
    order = torch.from_numpy(epoch_order(len(labels), run.seed, epoch)).to(device)
    mistakes = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    parts: list[Part] = []
    part_start, epoch_mistakes, epoch_loss, epoch_images = 0, 0, 0.0, 0
    ends = part_ends(batches)
    for step in range(batches):
        idx = order[step * setup.batch_size:(step + 1) * setup.batch_size]
        x = (images[idx].float() - shift) * PIXEL_SCALE[setup.init]
        y = labels[idx]
        out = net(x)
        loss = cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mistakes += (out.argmax(1) != y).sum()  # judged before this step's update: the error as trained
        loss_sum += loss.detach().double() * len(y)
        if step + 1 in ends:
            n = (step + 1 - part_start) * setup.batch_size
            seen += n
            loss_mean = loss_sum.item() / n  # sync: once a fifth, where cuda-convnet prints
            parts.append(Part(seen, mistakes.item() / n, round(loss_mean, 6) if math.isfinite(loss_mean) else None))
            epoch_mistakes += int(mistakes.item())  # a count: .item() of an int64 tensor
            epoch_loss += loss_sum.item()
            epoch_images += n
            mistakes.zero_()
            loss_sum.zero_()
            part_start = step + 1
            if _end_of(parts[-1], setup.threshold, run.stop_after_images):
                break
    epoch_loss /= epoch_images
    return parts, EpochProgress(epoch, epoch_mistakes / epoch_images,
                                round(epoch_loss, 6) if math.isfinite(epoch_loss) else None, epoch_images,
                                round(time.perf_counter() - started, 3))


def _end_of(part: Part, threshold: float, stop_after_images: int | None) -> str | None:
    if part.loss is None:  # not finite: the weights are gone
        return "diverged"
    if part.error <= threshold:
        return "reached"
    if stop_after_images is not None and part.images >= stop_after_images:
        return "behind"
    return None


def run_record(run: Run, images_per_epoch: int, parts: list[Part], epochs: list[EpochProgress],
               end: str) -> Figure1Run:
    reached = parts[-1].images if end == "reached" else None
    return Figure1Run(run.activation, run.lr, run.seed, end, images_per_epoch, parts[-1].images if parts else 0,
                      reached, None if reached is None else reached / images_per_epoch,
                      min((p.error for p in parts), default=None), round(sum(e.seconds for e in epochs), 3),
                      tuple(parts), tuple(epochs))
