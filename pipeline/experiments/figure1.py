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
from pathlib import Path

from pipeline.documents import markdown_table, saved_figure
from pipeline.experiments.figure1_net import Run, Setup
from pipeline.records import Chosen, Factor, Figure1Result, Figure1Run, SeedFactor

ACTIVATIONS = ("relu", "tanh")


NAMES = {"relu": "ReLU", "tanh": "tanh"}


MAX_WIDEN = 3


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
