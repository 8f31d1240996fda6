"""A training run's records: the spec every checkpoint carries (what its weights mean), metrics.jsonl's step and
epoch lines, events.jsonl's starts and resumes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from pipeline.config import AlexNetConfig, TrainConfig, upgrade_train_settings
from pipeline.records.base import Record, absent_when_none, to_plain
from pipeline.records.data import PixelStats, ShardParams

RUN_SETTINGS = "_run.json"  # a run folder: the settings its checkpoints belong to
METRICS = "metrics.jsonl"  # a run folder: one line per logged step and per epoch
EVENTS = "events.jsonl"  # a run folder: one line per start or resume
DIVERGED = "_diverged.json"  # a run folder: the step whose loss was not finite (the run is not done)
CHECKPOINTS_DIR = "checkpoints"  # a run folder: step-%09d.pt


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

    FORMAT: ClassVar[int] = 4
    model: AlexNetConfig
    train: TrainConfig
    pixels: PixelStats
    classes: RunClasses | None  # None: a checkpoint from before the table was stored (the ILSVRC-2012 list)
    inputs: RunInputs | None
    val_classes: int
    topology: Topology
    devices: tuple[str, ...] = ()
    short_side: int = ShardParams.short_side  # the training shards': eval, predict and export resize to it

    @classmethod
    def migrate(cls, data: dict, format: int) -> dict:
        """Format 1: a flat dict (its topology beside it); 2: topology (world_size, per_rank_batch) of epoch order 1;
        3: no short side (every run then trained on shards of short side 256)."""
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
        if format <= 2:
            old = data["topology"]
            data = {**data, "topology": {"order": 1, "global_batch": old["world_size"] * old["per_rank_batch"],
                                         "world_size": old["world_size"]}}
        return {**data, "short_side": 256}

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


@dataclass(frozen=True)
class LoaderPosition(Record):
    """Where a training loader stands: the epoch and the global batches of it already consumed (a checkpoint's
    `loader`; the loader resumes at the next batch)."""

    epoch: int
    batches: int


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
class PillowBuild:
    version: str
    simd: bool  # pillow-simd's build (its version ends in +simd)


@dataclass(frozen=True)
class GitCommit:
    commit: str
    modified: bool  # tracked files differ from the commit (events.jsonl's code_diff holds how)


@dataclass(frozen=True)
class CodeDiff:
    """The file beside events.jsonl that holds `git diff` of uncommitted code that ran, and its sha256."""

    file: str
    sha256: str


@dataclass(frozen=True)
class RunRecord(Record):
    """What a process ran on: the software, the hardware, the code's commit and the command line (in every line of
    events.jsonl and in eval.json). A field an earlier version did not record is None; one it recorded that this
    version does not know is passed over."""

    python: str | None = None
    torch: str | None = None
    torchvision: str | None = None
    dali: str | None = None
    cuda: str | None = None
    cudnn: int | None = None
    pillow: PillowBuild | None = None
    gpus: tuple[str, ...] = ()
    cpus: int | None = None
    cpus_usable: int | None = None
    torch_threads: int | None = None
    platform: str | None = None
    host: str | None = None
    git: GitCommit | None = None
    command: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> RunRecord:
        names = {f.name for f in fields(cls)}
        return super().from_json({k: v for k, v in data.items() if k in names} if isinstance(data, dict) else data)


@dataclass(frozen=True)
class Event(Record):
    """A line of events.jsonl: a start or resume of a training run, with what it ran on (pipeline/record.py)."""

    time: float
    event: str  # start | resume
    step: int
    epoch: int
    record: RunRecord  # what it ran on
    total_steps: int | None = None
    resumed_from: str | None = None
    world_size: int = 1
    code_diff: CodeDiff | None = absent_when_none()  # what uncommitted code differed from the commit


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


@dataclass(frozen=True)
class RunSettings(Record):
    """_run.json: the settings a run folder's checkpoints belong to (`pipeline.train.state.RunIdentity`), written
    when the folder is claimed; `key` is their digest."""

    key: str
    settings: dict


@dataclass(frozen=True)
class DivergedAt(Record):
    """_diverged.json: the first step whose loss (or, before a checkpoint, whose weights) was not finite, the step
    where it was seen, and the last finite checkpoint kept."""

    step: int
    detected_at: int
    last_checkpoint: str | None
