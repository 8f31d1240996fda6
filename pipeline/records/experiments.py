"""The experiments' records: the claims sweep (one `SweepRun` per (variant, seed) unit, the table `SweepTable` in
ablations.json) and Figure 1 (one `Figure1Run` per run of either sweep, the result `Figure1Result` in figure1.json).

Unit records are read back by the next run of their stage, which rebuilds the table or figure from them; the
products are written whole at the end. Optional fields are left out of the file when None.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.records.base import Record, absent_when_none

ABLATIONS = "ablations.json"  # ablate's product
FIGURE1 = "figure1.json"  # figure1's product (Figure 1 on CIFAR-10)


# ---------------------------------------------------------------------------------------------------------------
# the claims sweep


@dataclass(frozen=True)
class SweepRun(Record):
    """One (variant, seed): its val errors (the paper's test: 10-crop when evaluated, else the centre crop), its
    training error per epoch as counted while training, and its train–val gap (both in eval mode, centre crop, on
    as many images). A run whose loss was not finite has no errors and says at which step it diverged."""

    variant: str
    seed: int
    test: str | None  # ten_crop | centre; None: diverged
    top1_error: float | None
    top5_error: float | None
    samples: int | None
    train_top1_error: tuple[float | None, ...]
    gap_top1: float | None = absent_when_none()
    train_eval_top1_error: float | None = absent_when_none()
    diverged_at_step: int | None = absent_when_none()
    eval_sha256: str | None = absent_when_none()

    @property
    def diverged(self) -> bool:
        return self.diverged_at_step is not None

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"


@dataclass(frozen=True)
class MeanSd:
    mean: float | None
    sd: float | None  # None: one value


@dataclass(frozen=True)
class Difference:
    """variant − baseline of one metric, its standard error and whether it is inside 2 of them."""

    mean: float
    se: float | None  # None: a side with one seed has no noise estimate
    within_noise: bool | None


@dataclass(frozen=True)
class DivergedSeed:
    seed: int
    step: int


@dataclass(frozen=True)
class VariantRow:
    """A row of the table: a variant's seeds summarised, and its difference from the baseline."""

    variant: str
    what: str
    paper: str
    section: str
    seeds: tuple[int, ...]  # of the runs that finished
    test: str | None
    top1_error: MeanSd
    top5_error: MeanSd
    epochs_to_threshold: tuple[int | None, ...]
    epochs_to_threshold_mean: float | None
    train_top1_error_mean: tuple[float | None, ...]
    gap_top1: MeanSd = MeanSd(None, None)
    diverged: tuple[DivergedSeed, ...] = ()
    top1_error_diff: Difference | None = None
    top5_error_diff: Difference | None = None


@dataclass(frozen=True)
class SweepTable(Record):
    """ablations.json: the rows, the seeds' pooled noise and the smallest difference it lets the sweep detect; with
    the runs they came from and a sentence saying what was swept."""

    threshold: float
    seeds: int
    rows: tuple[VariantRow, ...]
    pooled_sd_top1: float | None
    smallest_detectable_top1: float | None
    runs: tuple[SweepRun, ...] = ()
    sweep: str = ""

    def row(self, variant: str) -> VariantRow | None:
        return next((r for r in self.rows if r.variant == variant), None)


# ---------------------------------------------------------------------------------------------------------------
# Figure 1


@dataclass(frozen=True)
class Part:
    """A fifth of an epoch: the training images seen so far, and the error and mean loss over that fifth's batches
    as they were trained (loss None: not finite)."""

    images: int
    error: float
    loss: float | None


@dataclass(frozen=True)
class EpochProgress:
    epoch: int
    training_error: float
    loss: float | None
    images: int
    seconds: float


@dataclass(frozen=True)
class Figure1Run(Record):
    """One run of a sweep: how it ended (reached the threshold, fell behind the best, hit the cap, diverged), when,
    and its training error curve."""

    activation: str
    lr: float
    seed: int
    end: str  # reached | behind | cap | diverged
    images_per_epoch: int
    images_trained: int
    images_to_threshold: int | None
    epochs_to_threshold: float | None
    lowest_error: float | None
    seconds: float
    parts: tuple[Part, ...] = ()
    epochs: tuple[EpochProgress, ...] = ()


@dataclass(frozen=True)
class Chosen:
    """An activation's chosen (fastest) rate and its seeds' times to the threshold."""

    lr: float | None
    seeds: tuple[int, ...]
    reached: tuple[bool, ...]
    images_to_threshold: tuple[int | None, ...]
    epochs_to_threshold: tuple[float | None, ...]
    images_mean: float | None
    images_sd: float | None


@dataclass(frozen=True)
class SeedFactor:
    seed: int
    factor: float


@dataclass(frozen=True)
class Factor:
    """tanh / ReLU in training images to the threshold: measured, or a bound when a chosen run never reached it."""

    kind: str  # measured | lower_bound | upper_bound | none
    value: float | None
    by_seed: tuple[SeedFactor, ...] = ()


@dataclass(frozen=True)
class Figure1Result(Record):
    """figure1.json: the factor and each activation's chosen rate; with the stage's settings as its params hold
    them, a sentence describing the experiment and every run."""

    threshold: float
    chosen: dict[str, Chosen]
    factor: Factor
    setup: dict | None = absent_when_none()  # the stage's `setup` params and `train_images`
    description: str | None = absent_when_none()
    runs: tuple[Figure1Run, ...] = ()
