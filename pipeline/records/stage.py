"""The stage engine's own files in a stage folder: the done marker `_stage.json` (written last: its key says the
folder is finished for those params and inputs) and `_plan.json` (the unit list of the run in progress)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.records.base import Record, absent_when_none


@dataclass(frozen=True)
class RecordedInput:
    """An input as the done marker keeps it: its digest, and its path as typed, relative to the stage folder and
    absolute (markers written before the last two existed have only the path as typed)."""

    path: str
    digest: str
    from_stage: str | None = absent_when_none()
    absolute: str | None = absent_when_none()


@dataclass(frozen=True)
class FinalCheckpoint:
    """Where a finished training run ended: its epoch and step, the checkpoint it wrote last and its size."""

    epoch: int
    step: int
    checkpoint: str
    stopped: str | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class StageMarker(Record):
    """_stage.json: the stage, its key (params, VERSION and input digests hashed), what it took and made, how long it
    took, and what the stage counted (each stage its own: images, samples and shards, runs, the final checkpoint)."""

    stage: str
    key: str
    version: int
    params: dict
    inputs: dict[str, RecordedInput]
    product: str | None = None
    seconds: float = 0.0
    images: int | None = absent_when_none()
    samples: int | None = absent_when_none()
    shards: int | None = absent_when_none()
    runs: int | None = absent_when_none()
    final: FinalCheckpoint | None = absent_when_none()


@dataclass(frozen=True)
class StagePlan(Record):
    """_plan.json: the key and unit list of the run in progress (`status`: partial, k of n units)."""

    stage: str
    key: str
    units: tuple[str, ...]
