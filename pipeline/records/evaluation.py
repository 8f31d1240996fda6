"""eval.json: a checkpoint's errors on the val shards (centre crop and the paper's 10-crop), per class, the
confusions, Figures 3 and 4, with what it takes to lay out the report."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import AlexNetConfig
from pipeline.records.base import Record, absent_when_none
from pipeline.records.run import RunRecord

EVAL = "eval.json"  # eval's product
REPORT = "report.md"  # report's product


@dataclass(frozen=True)
class CheckpointRef:
    path: str
    step: int
    epoch: int
    sha256: str = ""


@dataclass(frozen=True)
class ValRef:
    dir: str
    split: str
    manifest_sha256: str = ""


@dataclass(frozen=True)
class Errors:
    """Top-1/top-5 error of one test (§6: "the fraction of test images for which the correct label is not among
    the five labels considered most probable")."""

    top1_error: float
    top5_error: float
    samples: int
    images_per_s: float = 0.0


@dataclass(frozen=True)
class ClassAccuracy:
    index: int
    wnid: str
    name: str
    samples: int
    top1_accuracy: float


@dataclass(frozen=True)
class ConfusedPair:
    true: int
    predicted: int
    count: int
    true_wnid: str
    true_name: str
    predicted_wnid: str
    predicted_name: str


@dataclass(frozen=True)
class Example:
    """A val image's top-5 for the report's grid (names: from the checkpoint's class table)."""

    key: str
    label: int
    top5: tuple[int, ...]
    top5_prob: tuple[float, ...]
    name: str = ""
    top5_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class TowerKernels:
    kernels: list  # [K][3][h][w] conv1 weights
    chroma: tuple[float, ...]
    mean_chroma: float
    neighbour_correlation: float | None = absent_when_none()  # learnt structure (smooth) vs noise (about 0)
    neighbour_correlation_at_init: float | None = absent_when_none()  # the same of the run's step-0 weights


@dataclass(frozen=True)
class Figure3:
    towers: tuple[TowerKernels, ...]
    measure: str
    differ: bool | None = absent_when_none()  # two towers only


@dataclass(frozen=True)
class Neighbour:
    key: str
    label: int
    distance: float


@dataclass(frozen=True)
class Query:
    key: str
    label: int
    neighbours: tuple[Neighbour, ...]


@dataclass(frozen=True)
class Figure4:
    train_dir: str
    train_images: int
    limit: int
    layer: str
    queries: tuple[Query, ...]


@dataclass(frozen=True)
class EvalResult(Record):
    """eval.json: a checkpoint's errors on the val shards, with what it takes to lay out the report."""

    checkpoint: CheckpointRef
    val: ValRef
    model: AlexNetConfig
    centre: Errors
    samples: int
    per_class: tuple[ClassAccuracy, ...] = ()
    confused: tuple[ConfusedPair, ...] = ()
    examples: tuple[Example, ...] = ()
    ten_crop: Errors | None = absent_when_none()
    train_centre: Errors | None = absent_when_none()  # eval mode, centre crop, as many training images as val
    figure3: Figure3 | None = absent_when_none()
    figure4: Figure4 | None = absent_when_none()
    run_record: RunRecord | None = absent_when_none()

    @property
    def test(self) -> str:
        """The paper's test when it was run (10-crop), else the centre crop."""
        return "ten_crop" if self.ten_crop is not None else "centre"

    @property
    def paper_test(self) -> Errors:
        return self.ten_crop if self.ten_crop is not None else self.centre


@dataclass(frozen=True)
class ClassEntry:
    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class ExportedFrom:
    sha256: str
    step: int
    epoch: int


@dataclass(frozen=True)
class Preprocessing(Record):
    """What an exported network's input must be and what its outputs index, stored inside the .pt2 or .onnx file
    (preprocessing.json): another runtime needs nothing else."""

    input: str
    output: str
    short_side: int
    crop: int
    test_crop: str
    mean_255: tuple[float, ...]
    num_classes: int
    classes: tuple[ClassEntry, ...]
    model: AlexNetConfig
    checkpoint: ExportedFrom


@dataclass(frozen=True)
class ClassProbability:
    index: int
    wnid: str
    name: str
    probability: float


@dataclass(frozen=True)
class Prediction(Record):
    """`predict`'s answer for one image (a line of its --json output): the top classes, or why the file could not
    be read."""

    path: str
    top: tuple[ClassProbability, ...] | None = absent_when_none()
    error: str | None = absent_when_none()
