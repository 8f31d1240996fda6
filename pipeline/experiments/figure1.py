"""Figure 1 (§3.1) as the paper ran it: a four-layer CNN on CIFAR-10 with ReLUs against the same net with tanh
neurons, each at the learning rate that makes it fastest, timed to 25% training error.

The net is cuda-convnet's CIFAR-10 example (`layers-18pct.cfg`, the authors' own code): three 5×5 conv layers of
32, 32 and 64 maps, each followed by the neuron and a 3×3 stride-2 pool (max, average, average), and one fully
connected layer to the ten classes. Its response-normalisation layers are left out (see `four_layer_net`). "No
regularization of any kind": no dropout, no weight decay, no augmentation; the per-channel mean is subtracted.

The protocol, per activation (`next_run`): seed 0 at every rate of the grid, the grid's centre first; a run stops
when it reaches the threshold, or once it has seen as many images as the best run so far needed without reaching
it (it can no longer be the best). When the best rate is at the edge of the rates tried, the grid is widened one
step that way (at most `MAX_WIDEN` times a side). The best rate then runs for the other seeds. Training error is
the error on the training batches as they are trained, counted over each fifth of an epoch; time is counted in
training images seen. Only `summarize` turns runs into a factor, and a run that never reached the threshold makes
it a bound, never a number.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.documents import markdown_table, saved_figure
from pipeline.records import Chosen, EpochProgress, Factor, Figure1Result, Figure1Run, Part, SeedFactor, build, to_plain

ACTIVATIONS = ("relu", "tanh")
NAMES = {"relu": "ReLU", "tanh": "tanh"}
# cuda-convnet prints the training error once per data batch file, and CIFAR-10's training set is five of them
PARTS_PER_EPOCH = 5
MAX_WIDEN = 3
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


# ---------------------------------------------------------------------------------------------------------------
# the network


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


# ---------------------------------------------------------------------------------------------------------------
# one run


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


# ---------------------------------------------------------------------------------------------------------------
# the protocol


def rank(record: Figure1Run) -> tuple:
    """Smaller is better: reached, and sooner; else the lowest error; a diverged run last."""
    if record.images_to_threshold is not None:
        return 0, record.images_to_threshold, record.lr
    if record.end == "diverged":
        return 2, record.lr, 0.0
    return 1, record.lowest_error, record.lr


def centre_out(lrs: tuple[float, ...]) -> list[float]:
    """The grid's centre first, then outwards (the larger first at equal distance): a good rate early makes the
    best-so-far bound stop the worse ones soon."""
    grid = sorted(lrs)
    centre = (len(grid) - 1) / 2
    return sorted(grid, key=lambda lr: (abs(grid.index(lr) - centre), -lr))


def widen(tried: list[float], best: float, lrs: tuple[float, ...]) -> float | None:
    """The next rate beyond the edge the best rate sits on, one grid step further (√10 for a one-rate grid)."""
    grid = sorted(lrs)
    low, high = (grid[1] / grid[0], grid[-1] / grid[-2]) if len(grid) > 1 else (math.sqrt(10),) * 2
    if best == max(tried) and sum(lr > grid[-1] for lr in tried) < MAX_WIDEN:
        return float(f"{best * high:.3g}")
    if best == min(tried) and sum(lr < grid[0] for lr in tried) < MAX_WIDEN:
        return float(f"{best / low:.3g}")
    return None


def chosen_lr(records: list[Figure1Run]) -> float | None:
    sweep = [r for r in records if r.seed == 0]
    return min(sweep, key=rank).lr if sweep else None


def next_run(activation: str, records: list[Figure1Run], setup: Setup) -> Run | None:
    """The next run of `activation`'s sweep given its finished runs (None: the sweep is done)."""
    sweep = [r for r in records if r.activation == activation and r.seed == 0]
    tried = sorted({r.lr for r in sweep})
    best = min(sweep, key=rank) if sweep else None
    bound = best.images_to_threshold if best else None
    for lr in centre_out(setup.lrs):
        if lr not in tried:
            return Run(activation, lr, 0, bound)
    assert best is not None  # a sweep without runs returned its first lr above
    wider = widen(tried, best.lr, setup.lrs)
    if wider is not None and wider not in tried:
        return Run(activation, wider, 0, bound)
    done = {(r.lr, r.seed) for r in records if r.activation == activation}
    for seed in range(1, setup.seeds):
        if (best.lr, seed) not in done:
            return Run(activation, best.lr, seed)
    return None


# ---------------------------------------------------------------------------------------------------------------
# the result


def summarize(records: list[Figure1Run], setup: Setup) -> Figure1Result:
    """Per activation the chosen rate and its seeds' times to the threshold; the factor tanh / ReLU in images, with
    the seed-by-seed ratios. A seed that never reached the threshold counts with the images it trained, which makes
    its activation's time a lower bound, and the factor a bound (or nothing), never a made-up number."""
    chosen = {}
    for activation in ACTIVATIONS:
        mine = [r for r in records if r.activation == activation]
        lr = chosen_lr(mine)
        runs = sorted((r for r in mine if r.lr == lr), key=lambda r: r.seed)
        times = [r.images_to_threshold or r.images_trained for r in runs]
        chosen[activation] = Chosen(lr, tuple(r.seed for r in runs),
                                    tuple(r.images_to_threshold is not None for r in runs),
                                    tuple(r.images_to_threshold for r in runs),
                                    tuple(r.epochs_to_threshold for r in runs),
                                    statistics.fmean(times) if times else None,
                                    statistics.stdev(times) if len(times) > 1 else None)
    return Figure1Result(setup.threshold, chosen, factor(chosen["relu"], chosen["tanh"]))


def factor(relu: Chosen, tanh: Chosen) -> Factor:
    """images(tanh) / images(ReLU) to the threshold: measured when every chosen run reached it; a lower bound when
    only ReLU's all did (tanh would have needed more than it trained), an upper bound the other way round."""
    if not relu.seeds or not tanh.seeds:
        return Factor("none", None)
    assert tanh.images_mean is not None and relu.images_mean is not None  # both have seeds
    value = tanh.images_mean / relu.images_mean
    fast, slow = all(relu.reached), all(tanh.reached)
    if fast and slow:
        a = {s: t for s, t in zip(relu.seeds, relu.images_to_threshold) if t is not None}  # all reached
        pairs = [(s, t / a[s]) for s, t in zip(tanh.seeds, tanh.images_to_threshold) if s in a and t is not None]
        return Factor("measured", value, tuple(SeedFactor(s, f) for s, f in pairs))
    kind = "lower_bound" if fast else "upper_bound" if slow else "none"
    return Factor(kind, value if kind != "none" else None)


def factor_words(f: Factor) -> str:
    if f.kind == "measured":
        seeds = ", ".join(f"{p.factor:.1f}×" for p in f.by_seed)
        return f"{f.value:.1f}× (seed by seed: {seeds})" if len(f.by_seed) > 1 else f"{f.value:.1f}×"
    if f.kind == "lower_bound":
        return f"at least {f.value:.1f}× (tanh did not reach the threshold in every run)"
    if f.kind == "upper_bound":
        return f"at most {f.value:.1f}× (ReLU did not reach the threshold in every run)"
    return "no factor (neither reached the threshold in every run)"


def table_markdown(summary: Figure1Result, records: list[Figure1Run], description: str) -> str:
    """figure1.md: the headline, the chosen runs and the whole sweep."""
    threshold = f"{summary.threshold:.0%}"
    by_run: dict[tuple[str, float | None, int], Figure1Run] = {(r.activation, r.lr, r.seed): r for r in records}
    chosen = []
    for activation in ACTIVATIONS:
        c = summary.chosen[activation]
        for seed in c.seeds:
            r = by_run[activation, c.lr, seed]
            if r.images_to_threshold is not None:
                when = [f"{r.epochs_to_threshold:.1f}", f"{r.images_to_threshold:,}"]
            else:  # never reached: all we know is that it takes longer than the run trained
                when = [f"> {r.images_trained / r.images_per_epoch:.1f}", f"> {r.images_trained:,}"]
            chosen.append([NAMES[activation], f"{c.lr:g}", str(seed), *when, f"{r.seconds:.0f}"])
    sweep = []
    for activation in ACTIVATIONS:
        lr = summary.chosen[activation].lr
        for r in sorted((r for r in records if r.activation == activation and r.seed == 0), key=lambda r: r.lr):
            trained = r.images_trained / r.images_per_epoch
            how = {"reached": f"reached {threshold} at epoch {trained:.1f}", "behind": "stopped: behind the best",
                   "cap": "the cap, never reached", "diverged": "diverged"}[r.end]
            rate = f"**{r.lr:g}**" if r.lr == lr else f"{r.lr:g}"
            low = "—" if r.lowest_error is None else f"{r.lowest_error:.1%}"
            sweep.append([NAMES[activation], rate, how, f"{trained:.1f}", low])
    return "\n".join([
        "# Figure 1: ReLU against tanh on CIFAR-10", "", description, "",
        f"**tanh / ReLU, training images to {threshold} training error: {factor_words(summary.factor)}.** "
        "The paper (§3.1, Figure 1): about 6×.", "",
        *markdown_table(["neurons", "learning rate", "seed", f"epochs to {threshold}", f"images to {threshold}",
                         "seconds"], chosen),
        "", "The learning-rate sweep (seed 0; the chosen rate in bold):", "",
        *markdown_table(["neurons", "learning rate", "how it ended", "epochs trained", "lowest training error"], sweep),
        "", "![Figure 1: training error rate against epochs](figure1.png)", ""])


def plot(summary: Figure1Result, records: list[Figure1Run], path: Path) -> None:
    """figure1.png as the paper draws it: training error rate against epochs, ReLU solid, tanh dashed, the threshold
    line; each activation's chosen rate, seed 0 dark and the other seeds light; the factor in the legend."""
    with saved_figure(path, (5, 4), dpi=120) as (_, ax):
        for activation, style in (("relu", "-"), ("tanh", "--")):
            c = summary.chosen[activation]
            for r in records:
                if r.activation == activation and r.lr == c.lr and r.parts:
                    x = [0.0] + [p.images / r.images_per_epoch for p in r.parts]
                    y = [0.9] + [p.error for p in r.parts]  # chance for ten classes before the first step
                    first = r.seed == c.seeds[0]
                    ax.plot(x, y, style, color="black", lw=1.4 if first else 0.8, alpha=1.0 if first else 0.35,
                            label=f"{NAMES[activation]} (lr {c.lr:g})" if first else None)
        ax.axhline(summary.threshold, color="grey", lw=0.8)
        ax.plot([], [], " ", label=f"tanh / ReLU to {summary.threshold:.0%}: {_short(summary.factor)}")
        ax.set_xlabel("Epochs")
        ax.set_ylabel("Training error rate")
        ax.set_ylim(0, 0.95)
        ax.set_xlim(left=0)
        ax.legend(frameon=False)


def _short(f: Factor) -> str:
    return {"measured": "{:.1f}×", "lower_bound": "≥ {:.1f}×", "upper_bound": "≤ {:.1f}×"}.get(
        f.kind, "none").format(f.value)
