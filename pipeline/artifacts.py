"""The files the stages hand each other, as typed records: one constant per file name, one frozen dataclass per
format. Each record has a `FORMAT` number, one `from_json` that reads every format ever written (the migrations
live in its `migrate` and nowhere else) and one `to_json`, the only writer.

Format 1 is what the first version wrote, and a file without a `format` field is format 1, so that no byte of an
existing output changes (manifests and pca.json key the stages downstream). No torch, no numpy: `status`, `report`
and an up-to-date stage read these without them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pipeline.config import AlexNetConfig, TrainConfig, upgrade_train_settings
from pipeline.errors import PipeError

MANIFEST = "manifest.json"  # a shard folder's product
TIMM_INFO = "_info.json"  # timm's shard metadata beside it (derived from the manifest)
PCA = "pca.json"  # pca-stats' product
RUN_SETTINGS = "_run.json"  # a run folder: the settings its checkpoints belong to
METRICS = "metrics.jsonl"  # a run folder: one line per logged step and per epoch
EVENTS = "events.jsonl"  # a run folder: one line per start or resume
DIVERGED = "_diverged.json"  # a run folder: the step whose loss was not finite (the run is not done)
CHECKPOINTS_DIR = "checkpoints"  # a run folder: step-%09d.pt
EVAL = "eval.json"  # eval's product
REPORT = "report.md"  # report's product
ABLATIONS = "ablations.json"  # ablate's product
FIGURE1 = "figure1.json"  # figure1's product (Figure 1 on CIFAR-10)

R = TypeVar("R", bound="Record")


def absent_when_none(default: Any = None) -> Any:
    """A field that is left out of the file when None (an optional part: ten_crop, figure4, lr_drop, …)."""
    return field(default=default, metadata={"absent_when_none": True})


class Record:
    """A frozen dataclass read from and written to JSON. Subclasses set `FORMAT` and, when it grew, `migrate`."""

    FORMAT: ClassVar[int] = 1

    @classmethod
    def migrate(cls, data: dict, format: int) -> dict:
        """`data` as written in `format` (< FORMAT), rewritten in this format's shape (keys, not types)."""
        return data

    @classmethod
    def from_json(cls: type[R], data: dict) -> R:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, found {type(data).__name__}")
        written = data.get("format", 1)
        if not isinstance(written, int) or written > cls.FORMAT:
            raise ValueError(f"{cls.__name__}: format {written!r} is newer than this version reads ({cls.FORMAT})")
        body = {k: v for k, v in data.items() if k != "format"}
        return build(cls, cls.migrate(body, written) if written < cls.FORMAT else body)

    def to_json(self) -> dict:
        plain = to_plain(self)
        return {"format": self.FORMAT, **plain} if self.FORMAT > 1 else plain

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        """The record in the JSON file `path`; a file that is not one is a one-line error naming it."""
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise PipeError(f"{path}: no such file") from None
        except (ValueError, TypeError, KeyError) as e:
            raise PipeError(f"{path}: expected {cls.__name__} JSON, found {type(e).__name__}: {e}") from None


def to_plain(value: Any) -> Any:
    """Dataclasses → dicts (fields marked absent_when_none left out when None), tuples → lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get("absent_when_none"):
                continue
            out[f.name] = to_plain(item)
        return out
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def build(kind: Any, value: Any) -> Any:
    """`value` (parsed JSON) as an instance of the type `kind`: dataclasses from dicts (an unknown key is an
    error), tuples from lists, ints where floats are expected as floats; anything untyped as it is."""
    if value is None or kind is Any:
        return value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        return build(next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        item = args[0] if args else Any
        return tuple(build(item, v) for v in value)
    if origin is dict:
        return {k: build(args[1], v) for k, v in value.items()} if args else dict(value)
    if origin is list:
        return [build(args[0], v) for v in value] if args else list(value)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ValueError(f"{kind.__name__}: expected an object, found {value!r}")
        hints = typing.get_type_hints(kind)
        names = {f.name for f in fields(kind)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{kind.__name__}: unknown field(s) {', '.join(unknown)}")
        missing = [f.name for f in fields(kind) if f.name not in value and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{kind.__name__}: missing field(s) {', '.join(missing)}")
        return kind(**{k: build(hints[k], v) for k, v in value.items()})
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------------------------
# shards: manifest.json


@dataclass(frozen=True)
class ShardParams:
    """The shard stage's params (they key it); defaults for manifests written before a param existed."""

    split: str = ""
    shard_size: int = 1000
    short_side: int = 256
    quality: int = 95
    seed: int = 0
    classes: str = "ilsvrc2012"  # the built-in list, or the name of the --classes file
    max_classes: int | None = absent_when_none()  # a capped split: the first N classes (sorted wnids)
    per_class: int | None = absent_when_none()  # … and at most N images of each, a seeded choice


@dataclass(frozen=True)
class ShardEntry:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ClassCount:
    index: int  # the global label
    wnid: str
    name: str
    samples: int


@dataclass(frozen=True)
class SkippedImage:
    key: str | None  # None: lost with a damaged class tar before it was listed
    wnid: str
    path: str
    reason: str


@dataclass(frozen=True)
class RepairedImage:
    key: str
    repaired: tuple[str, ...]


@dataclass(frozen=True)
class IgnoredEntry:
    name: str
    reason: str


@dataclass(frozen=True)
class Manifest(Record):
    """The single source of truth about a shard set; no times, hosts or absolute paths (its hash keys the stages
    downstream)."""

    split: str
    params: ShardParams
    samples: int
    bytes: int
    shards: tuple[ShardEntry, ...]
    classes: tuple[ClassCount, ...]
    num_classes_total: int = 1000
    skipped: tuple[SkippedImage, ...] = ()
    repaired: tuple[RepairedImage, ...] = ()
    ignored_members: tuple[IgnoredEntry, ...] = ()

    def require_split(self, split: str, folder: Path, option: str | None = None) -> Manifest:
        """This manifest, when it is of `split`'s shards (train shards given as val are refused in one line)."""
        if self.split != split:
            raise PipeError(f"{folder}: expected {split} shards, found split {self.split!r} in its {MANIFEST}",
                            option=option)
        return self

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """A shard folder's manifest (`path` is the folder or the file)."""
        file = path / MANIFEST if path.is_dir() or not path.name.endswith(".json") else path
        if not file.is_file():
            raise PipeError(f"{path}: no {MANIFEST} (expected a finished `alexnet-pipe shard` output folder)")
        return super().read(file)


# ---------------------------------------------------------------------------------------------------------------
# pca-stats: pca.json


@dataclass(frozen=True)
class PixelStats:
    """What the loaders subtract and shift by: the training set's per-channel mean and its RGB eigen-pairs, in
    [0, 1] units (§2, §4.1). From pca.json, or from a checkpoint (the values it trained with)."""

    mean: tuple[float, ...]
    eigvals: tuple[float, ...]
    eigvecs: tuple[tuple[float, ...], ...]  # column i = eigenvector i


@dataclass(frozen=True)
class Pca(Record):
    """pca.json: exact RGB statistics of every training pixel."""

    pixel_scale: str
    pixels: int
    images: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cov: tuple[tuple[float, ...], ...]
    eigvals: tuple[float, ...]
    eigvecs: tuple[tuple[float, ...], ...]
    source_manifest_sha256: str

    @classmethod
    def from_json(cls, data: dict) -> Pca:
        """pca.json; other keys beside its fields (published statistics may carry notes) are passed over."""
        names = {f.name for f in fields(cls)}
        return super().from_json({k: v for k, v in data.items() if k in names} if isinstance(data, dict) else data)

    @property
    def stats(self) -> PixelStats:
        return PixelStats(self.mean, self.eigvals, self.eigvecs)


# ---------------------------------------------------------------------------------------------------------------
# a training run: the spec its checkpoints carry


@dataclass(frozen=True)
class RunClasses:
    """The name of every output (index → wnid and name) and which outputs the training shards held."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]
    trained: tuple[int, ...]


@dataclass(frozen=True)
class RunInputs:
    """The digests of what the run trained on (sha256 of the manifests and of pca.json)."""

    train: str
    val: str
    pca: str


@dataclass(frozen=True)
class Topology:
    """What a run's epochs depend on: the version of the epoch order (`pipeline.augment.order.ORDER_VERSION`) and
    the global batch; and the number of ranks that wrote the checkpoint (a resume may use another)."""

    order: int
    global_batch: int
    world_size: int


@dataclass(frozen=True)
class RunSpec(Record):
    """Everything a checkpoint's weights mean: the model and training settings, the pixel statistics trained with,
    the class table, the data it came from and the topology that wrote it. Eval, predict and export need nothing
    else. Format 1 was one flat dict (`config`) beside a separate `topology`."""

    FORMAT: ClassVar[int] = 3
    model: AlexNetConfig
    train: TrainConfig
    pixels: PixelStats
    classes: RunClasses | None  # None: a checkpoint from before the table was stored (the ILSVRC-2012 list)
    inputs: RunInputs | None
    val_classes: int
    topology: Topology
    devices: tuple[str, ...] = ()

    @classmethod
    def migrate(cls, data: dict, format: int) -> dict:
        """Format 1: a flat dict (its topology beside it); 2: topology (world_size, per_rank_batch) of epoch order 1."""
        if format == 1:
            world_size = data.get("world_size", 1)
            train = upgrade_train_settings(data["train"])
            batch = train.get("batch_size", TrainConfig().batch_size)
            data = {"model": data["model"], "train": train,
                    "pixels": {k: data[k] for k in ("mean", "eigvals", "eigvecs")},
                    "classes": data.get("classes"), "inputs": data.get("manifests"),
                    "val_classes": data.get("val_classes", 0),
                    "topology": data.get("topology") or {"world_size": world_size,
                                                         "per_rank_batch": batch // world_size},
                    "devices": data.get("devices", [])}
        old = data["topology"]
        return {**data, "topology": {"order": 1, "global_batch": old["world_size"] * old["per_rank_batch"],
                                     "world_size": old["world_size"]}}

    def trajectory(self) -> dict:
        """What a run's checkpoints must agree with to be resumed: the model, the result-changing training settings
        and the digests of what it trains on (the same dict `_run.json` holds)."""
        return {"model": self.model.to_dict(), "train": self.train.trajectory(),
                "inputs": to_plain(self.inputs) if self.inputs else None}

    @classmethod
    def of_checkpoint(cls, state: dict) -> RunSpec:
        """The spec of a loaded checkpoint dict (format 1 kept its topology beside `config`)."""
        config = state["config"]
        if config.get("format", 1) == 1 and "topology" in state:
            config = {**config, "topology": state["topology"]}
        return cls.from_json(config)


# ---------------------------------------------------------------------------------------------------------------
# eval: eval.json


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
    run_record: dict | None = absent_when_none()

    @property
    def test(self) -> str:
        """The paper's test when it was run (10-crop), else the centre crop."""
        return "ten_crop" if self.ten_crop is not None else "centre"

    @property
    def paper_test(self) -> Errors:
        return self.ten_crop if self.ten_crop is not None else self.centre


# ---------------------------------------------------------------------------------------------------------------
# a run's metrics.jsonl


@dataclass(frozen=True)
class StepRecord(Record):
    """A logged training step. The speed fields are absent in runs from before they were measured."""

    step: int
    epoch: int
    loss: float
    lr: float
    images_per_s: float
    data_wait: float | None = None
    step_ms: float | None = None
    mfu: float | None = None
    precision: str | None = None
    time: float | None = None  # wall clock, to follow a run live


@dataclass(frozen=True)
class EpochRecord(Record):
    """The end of an epoch: validation, the epoch's training loss and error, what the schedule did."""

    epoch: int
    step: int
    val_top1_error: float
    val_top5_error: float
    val_samples: int
    lr: float
    train_loss: float | None = None
    train_top1_error: float | None = None  # on the batches as they were trained (augmented, dropout on)
    lr_drop: str | None = absent_when_none()
    lr_held: str | None = absent_when_none()
    not_learning: bool | None = absent_when_none()
    time: float | None = None


@dataclass(frozen=True)
class Event(Record):
    """A line of events.jsonl: a start or resume of a training run, with what it ran on (pipeline/record.py)."""

    time: float
    event: str  # start | resume
    step: int
    epoch: int
    record: dict  # the run record: software, hardware, git commit, command line
    total_steps: int | None = None
    resumed_from: str | None = None
    world_size: int = 1
    code_diff: dict | None = absent_when_none()  # {file, sha256}: what uncommitted code differed from the commit


@dataclass(frozen=True)
class Metrics:
    steps: tuple[StepRecord, ...]
    epochs: tuple[EpochRecord, ...]


def parse_metrics(lines: Iterable[str]) -> Metrics:
    """Step and epoch records from metrics.jsonl's lines; a line cut short (a crash or a full disk while it was
    appended) is passed over, so a reader never fails on what a resume repairs."""
    steps, epochs = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "val_top1_error" in record:
            epochs.append(EpochRecord.from_json(record))
        else:
            steps.append(StepRecord.from_json(record))
    return Metrics(tuple(steps), tuple(epochs))


def read_metrics(run_dir: Path) -> Metrics:
    """A run folder's metrics (none yet: empty)."""
    path = run_dir / METRICS
    return parse_metrics(path.read_text().splitlines() if path.is_file() else ())
