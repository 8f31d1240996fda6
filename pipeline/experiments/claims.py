"""The paper's claims as a sweep: a baseline and one variant per claim, each trained for several seeds, and the
table that compares them without implying more than the seeds can tell.

A variant is the recipe plus the settings it changes (`Variant.changes`, names of `pipeline/config.py` fields). No
torch here: the table is built from the runs' eval.json and metrics.jsonl.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TypeVar

from pipeline.config import AlexNetConfig, TrainConfig
from pipeline.documents import markdown_table, saved_figure
from pipeline.records import (
    EVAL,
    Difference,
    DivergedSeed,
    EvalResult,
    MeanSd,
    SweepRun,
    SweepTable,
    VariantRow,
    read_metrics,
)

BASELINE = "baseline"
DETECTABLE_Z = 2.0  # a difference counts as measured when it exceeds 2 standard errors (about 95%)


@dataclass(frozen=True)
class Variant:
    name: str
    what: str  # what changes, in words
    changes: dict  # setting → value
    paper: str  # the paper's reported effect of the baseline's choice
    section: str


VARIANTS = (
    Variant(BASELINE, "the recipe as it is (ReLU, two towers, LRN, overlapping pools, crops+mirrors, lighting, "
            "dropout 0.5)", {}, "-", "-"),
    Variant("tanh", "tanh neurons in place of ReLUs", {"activation": "tanh"},
            "ReLU: a 4-layer CNN reaches 25% training error on CIFAR-10 six times faster", "§3.1, Fig. 1"),
    Variant("one-tower", "§3.2's one-GPU net (half the kernels in conv1-4)", {"towers": 1},
            "two GPUs: -1.7% top-1, -1.2% top-5", "§3.2"),
    Variant("no-lrn", "no local response normalization", {"norm": "none"},
            "LRN: -1.4% top-1, -1.2% top-5", "§3.3"),
    Variant("batch-norm", "BatchNorm2d in place of each LRN (not in the paper)", {"norm": "batch"},
            "- (BN came in 2015)", "-"),
    Variant("plain-pool", "non-overlapping pools z=2, s=2", {"pool": "plain"},
            "overlapping pools: -0.4% top-1, -0.3% top-5", "§3.4"),
    Variant("no-crop-mirror", "centre crop, no mirrors", {"random_crop": False, "mirror": False},
            "crops+mirrors: without them, substantial overfitting", "§4.1"),
    Variant("no-lighting", "no PCA lighting noise", {"lighting": False},
            "PCA lighting: -1% top-1 (over 1%)", "§4.1"),
    Variant("no-dropout", "no dropout in fc6/fc7", {"dropout": 0.0},
            "dropout: without it, substantial overfitting; it doubles the iterations to converge", "§4.2"),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


def variant(name: str) -> Variant:
    return VARIANTS[VARIANT_NAMES.index(name)]


def unit_name(variant_name: str, seed: int) -> str:
    return f"{variant_name}-seed{seed}"


def sweep_units(variants: tuple[str, ...], seeds: tuple[int, ...]) -> list[tuple[str, int]]:
    """(variant, seed) pairs, seed-major: a sweep cut short has every variant at its first seeds."""
    return [(name, seed) for seed in seeds for name in variants]


def variant_settings(name: str, model: AlexNetConfig, cfg: TrainConfig, seed: int
                     ) -> tuple[AlexNetConfig, TrainConfig]:
    """The recipe's settings with the variant's changes and this seed."""
    changes = variant(name).changes
    model_names = {f.name for f in fields(AlexNetConfig)}
    return (replace(model, **{k: v for k, v in changes.items() if k in model_names}),
            replace(cfg, seed=seed, **{k: v for k, v in changes.items() if k not in model_names}))


SWITCHES = tuple(dict.fromkeys(k for v in VARIANTS for k in v.changes))  # the settings some variant changes


def switches(name: str, seed: int, model: AlexNetConfig, cfg: TrainConfig) -> dict[str, bool | int | float | str]:
    """The value of each setting a variant may change, in variant `name`'s run (the HParams view's columns)."""
    variant_model, variant_cfg = variant_settings(name, model, cfg, seed)
    return {k: getattr(variant_model if hasattr(variant_model, k) else variant_cfg, k) for k in SWITCHES}


# ---------------------------------------------------------------------------------------------------------------
# the table


def sweep_record(name: str, seed: int, run_dir: Path, eval_dir: Path) -> SweepRun:
    """One run's numbers for the table: val errors (the paper's test: 10-crop when evaluated, else the centre crop),
    its training error per epoch (as counted while training) and its train–val gap (both in eval mode, centre
    crop, on as many images; None for an eval without the training error)."""
    result = EvalResult.read(eval_dir / EVAL)
    errors, train = result.paper_test, result.train_centre
    return SweepRun(name, seed, result.test, errors.top1_error, errors.top5_error, result.samples,
                    tuple(e.train_top1_error for e in read_metrics(run_dir).epochs),
                    gap_top1=None if train is None else result.centre.top1_error - train.top1_error,
                    train_eval_top1_error=None if train is None else train.top1_error)


def diverged_sweep_record(name: str, seed: int, run_dir: Path, step: int) -> SweepRun:
    """A run whose loss was not finite at `step`: no val errors, its training error up to then."""
    return SweepRun(name, seed, None, None, None, None, tuple(e.train_top1_error for e in read_metrics(run_dir).epochs),
                    diverged_at_step=step)


def epochs_to(errors: tuple[float | None, ...], threshold: float) -> int | None:
    """Epochs trained until the training error first was at or below `threshold` (None: never)."""
    return next((i + 1 for i, e in enumerate(errors) if e is not None and e <= threshold), None)


_T = TypeVar("_T")


def _complete(values: list[_T | None]) -> list[_T] | None:
    """`values` when none of them is None, else None."""
    known = [v for v in values if v is not None]
    return known if len(known) == len(values) else None


def mean_sd(values: list[float] | None) -> MeanSd:
    """Over the seeds (None or none: unknown); the sd of one value is None."""
    if not values:
        return MeanSd(None, None)
    return MeanSd(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)


def summarize(records: list[SweepRun], threshold: float) -> SweepTable:
    """Per variant: mean ± sd over seeds of the val errors, the difference from the baseline ± its standard error,
    whether it is within the seeds' noise, and the epochs to `threshold` training error; plus the smallest
    difference this sweep can detect."""
    rows = [_row(name, [r for r in records if r.variant == name], threshold)
            for name in VARIANT_NAMES if any(r.variant == name for r in records)]
    base = next((r for r in rows if r.variant == BASELINE), None)
    seeds = len(base.seeds) if base else 0
    rows = [replace(row, top1_error_diff=_difference(row.top1_error, base.top1_error, row, base),
                    top5_error_diff=_difference(row.top5_error, base.top5_error, row, base))
            if base and row is not base else row for row in rows]
    pooled = _pooled_sd([row.top1_error for row in rows], [len(row.seeds) for row in rows])
    detectable = DETECTABLE_Z * pooled * math.sqrt(2 / seeds) if pooled is not None and seeds else None
    return SweepTable(threshold, seeds, tuple(rows), pooled, detectable)


def _row(name: str, every: list[SweepRun], threshold: float) -> VariantRow:
    every = sorted(every, key=lambda r: r.seed)
    runs = [r for r in every if not r.diverged]  # the errors are of the runs that finished
    reached = tuple(epochs_to(r.train_top1_error, threshold) for r in runs)
    reached_all = _complete(list(reached))
    about = variant(name)
    return VariantRow(
        name, about.what, about.paper, about.section, tuple(r.seed for r in runs), runs[0].test if runs else None,
        mean_sd(_complete([r.top1_error for r in runs])), mean_sd(_complete([r.top5_error for r in runs])),
        reached, statistics.fmean(reached_all) if reached_all else None,
        tuple(_mean_curve([r.train_top1_error for r in runs])) if runs else (),
        gap_top1=mean_sd(_complete([r.gap_top1 for r in runs])),
        diverged=tuple(DivergedSeed(r.seed, r.diverged_at_step) for r in every if r.diverged_at_step is not None))


def _difference(row: MeanSd, base: MeanSd, row_of: VariantRow, base_of: VariantRow) -> Difference | None:
    if row.mean is None or base.mean is None:  # every seed of one of them diverged
        return None
    diff = row.mean - base.mean
    if row.sd is None or base.sd is None:
        return Difference(diff, None, None)
    se = math.sqrt(row.sd ** 2 / len(row_of.seeds) + base.sd ** 2 / len(base_of.seeds))
    return Difference(diff, se, abs(diff) <= DETECTABLE_Z * se)


def _pooled_sd(spreads: list[MeanSd], sizes: list[int]) -> float | None:
    """The seeds' standard deviation pooled over every variant (each has its own mean)."""
    parts = [(n - 1, m.sd) for m, n in zip(spreads, sizes) if m.sd is not None]
    dof = sum(n for n, _ in parts)
    return math.sqrt(sum(n * sd**2 for n, sd in parts) / dof) if dof else None


def _mean_curve(curves: list[tuple[float | None, ...]]) -> list[float | None]:
    length = min(len(c) for c in curves)
    return [statistics.fmean(v) if (v := _complete([c[i] for c in curves])) is not None else None
            for i in range(length)]


def speedup(summary: SweepTable, fast: str = BASELINE, slow: str = "tanh") -> float | None:
    """Figure 1's measure in this recipe: epochs to the threshold with `slow`'s neurons over those with `fast`'s
    (ReLU)."""
    a, b = summary.row(fast), summary.row(slow)
    if a is None or b is None:
        return None
    return b.epochs_to_threshold_mean / a.epochs_to_threshold_mean if a.epochs_to_threshold_mean and \
        b.epochs_to_threshold_mean else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table_markdown(summary: SweepTable, description: str) -> str:
    """ablations.md: the table and what it can and cannot tell."""
    threshold = summary.threshold
    header = ["variant", "what changes", "paper (section)", "top-1 error", "top-5 error", "Δ top-1", "Δ top-5",
              "train–val gap (top-1)", f"epochs to {threshold:.0%} train error"]
    lines = ["# Ablations: the paper's claims, measured", "", description, "",
             f"Val error in %, mean ± sd over {summary.seeds} seed(s), the paper's test (10-crop) unless marked. "
             "Difference = variant − baseline ± its standard error (positive: the variant is worse, i.e. the "
             "paper's choice helps). Epochs: epochs until the training top-1 error first reached "
             f"{threshold:.0%}, mean over seeds (— when a seed never did). Train–val gap: val top-1 error − "
             "training top-1 error, both in eval mode with the centre crop on as many images (the training error "
             "counted during training has dropout and augmentation on); a larger gap is more overfitting.", "",
             *markdown_table(header, [_row_cells(row) for row in summary.rows]), "", _noise_note(summary)]
    factor = speedup(summary)
    if factor is not None:
        lines += ["", f"ReLU vs tanh in this recipe: tanh needed {factor:.1f}× the epochs of ReLU to reach "
                  f"{threshold:.0%} training error (the paper's Figure 1: about 6× to 25% on CIFAR-10 with a 4-layer "
                  "CNN, which `alexnet-pipe figure1` reruns)."]
    lines += ["", "![training error against epochs](training-error.png)", "", "![val top-1 error](ablations.png)", ""]
    return "\n".join(lines)


def _row_cells(row: VariantRow) -> list[str]:
    cells = [row.variant, row.what, f"{row.paper} ({row.section})"]
    for m, top1 in ((row.top1_error, True), (row.top5_error, False)):
        cell = "diverged" if m.mean is None else (
            f"{_pct(m.mean)} ± {_pct(m.sd)}" + ("" if row.test == "ten_crop" else " (centre)"))
        if row.diverged and top1:
            cell += " (" + ", ".join(f"seed {d.seed} diverged at step {d.step}" for d in row.diverged) + ")"
        cells.append(cell)
    for d in (row.top1_error_diff, row.top5_error_diff):
        if d is None:
            cells.append("-")
        elif d.se is None:
            cells.append(f"{100 * d.mean:+.1f} (one seed: no noise estimate)")
        else:
            verdict = "within the noise" if d.within_noise else "beyond 2 s.e."
            cells.append(f"{100 * d.mean:+.1f} ± {100 * d.se:.1f} ({verdict})")
    gap = row.gap_top1
    cells.append("-" if gap.mean is None else f"{_pct(gap.mean)} ± {_pct(gap.sd)}")
    reached = row.epochs_to_threshold_mean
    cells.append("—" if reached is None else f"{reached:.1f}")
    return cells


def _noise_note(summary: SweepTable) -> str:
    """How big a difference the seeds let this sweep tell from noise."""
    detectable = summary.smallest_detectable_top1
    if detectable is None:
        return "One seed per variant: the sweep cannot tell an effect from seed noise; run with more seeds."
    return (f"Seed noise: the seeds' top-1 error sd, pooled over the variants, is {_pct(summary.pooled_sd_top1)} "
            f"points, so with {summary.seeds} seeds the smallest top-1 difference this sweep can "
            f"detect (2 standard errors) is about {_pct(detectable)} points. The paper's effects are "
            "0.3–1.7 points on ImageNet's 50,000 val images; a smaller measured difference here says "
            "nothing either way." + (" With 2 seeds each sd is itself a rough estimate (one degree of "
                                     "freedom): read these verdicts as a first look." if summary.seeds < 3 else ""))


def plot(summary: SweepTable, out: Path) -> list[str]:
    """training-error.png (training error against epochs, ReLU vs tanh, mean over seeds; not named figure1: that
    is `alexnet-pipe figure1`'s CIFAR-10 experiment) and ablations.png (val top-1 error per variant, mean ± sd)."""
    rows = {r.variant: r for r in summary.rows}
    with saved_figure(out / "training-error.png", (6, 3.5)) as (_, ax):
        for name, label, style in ((BASELINE, "ReLU", "-"), ("tanh", "tanh", "--")):
            if name in rows:
                curve = [math.nan if e is None else e for e in rows[name].train_top1_error_mean]
                ax.plot(range(1, len(curve) + 1), curve, style, marker=".", label=f"{label} (mean of seeds)")
        ax.axhline(summary.threshold, color="grey", lw=0.8, label=f"threshold {summary.threshold:.0%}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training top-1 error")
        ax.set_title("ReLU vs tanh in this recipe")
        ax.legend()
        ax.grid(alpha=0.3)
    with saved_figure(out / "ablations.png", (7, 3.5)) as (_, ax):
        errors = {n: r.top1_error for n, r in rows.items() if r.top1_error.mean is not None}  # not only diverged
        names = list(errors)
        means = [100 * (errors[n].mean or 0) for n in names]
        sds = [100 * (errors[n].sd or 0) for n in names]
        ax.bar(names, means, yerr=sds, capsize=3, color=["tab:grey" if n == BASELINE else "tab:blue" for n in names])
        ax.set_ylabel("val top-1 error, % (mean ± sd)")
        ax.tick_params(axis="x", rotation=35)
    return ["training-error.png", "ablations.png"]
