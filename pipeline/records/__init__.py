"""Every file a stage writes or reads, as a typed record: one constant per file name, one frozen dataclass per
format, each with its `FORMAT` number and its one `migrate` (`base`). Grouped by who writes them: the data stages
(`data`: manifest.json, pca.json), a training run (`run`: the checkpoint's spec, metrics.jsonl, events.jsonl,
_run.json, _diverged.json), eval (`evaluation`: eval.json) and the experiments (`experiments`: the claims sweep and
Figure 1)."""

from pipeline.records.base import Record, absent_when_none, build, to_plain
from pipeline.records.data import (
    MANIFEST,
    PCA,
    TIMM_INFO,
    ClassCount,
    IgnoredEntry,
    Manifest,
    Pca,
    PixelStats,
    RepairedImage,
    ShardEntry,
    ShardIndex,
    ShardParams,
    ShardUnit,
    SkippedImage,
)
from pipeline.records.evaluation import (
    EVAL,
    REPORT,
    CheckpointRef,
    ClassAccuracy,
    ConfusedPair,
    Errors,
    EvalResult,
    Example,
    Figure3,
    Figure4,
    Neighbour,
    Query,
    TowerKernels,
    ValRef,
)
from pipeline.records.experiments import (
    ABLATIONS,
    FIGURE1,
    Chosen,
    Difference,
    DivergedSeed,
    EpochProgress,
    Factor,
    Figure1Result,
    Figure1Run,
    MeanSd,
    Part,
    SeedFactor,
    SweepRun,
    SweepTable,
    VariantRow,
)
from pipeline.records.run import (
    CHECKPOINTS_DIR,
    DIVERGED,
    EVENTS,
    METRICS,
    RUN_SETTINGS,
    DivergedAt,
    EpochRecord,
    Event,
    Metrics,
    RunClasses,
    RunInputs,
    RunSettings,
    RunSpec,
    StepRecord,
    Topology,
    parse_metrics,
    read_metrics,
)
from pipeline.records.stage import FinalCheckpoint, RecordedInput, StageMarker, StagePlan

__all__ = [
    "ABLATIONS", "CHECKPOINTS_DIR", "DIVERGED", "EVAL", "EVENTS", "FIGURE1", "MANIFEST", "METRICS", "PCA",
    "REPORT", "RUN_SETTINGS", "TIMM_INFO", "CheckpointRef", "Chosen", "ClassAccuracy", "ClassCount",
    "ConfusedPair", "Difference", "DivergedAt", "DivergedSeed", "EpochProgress", "EpochRecord", "Errors",
    "EvalResult", "Event", "Example", "Factor", "Figure1Result", "Figure1Run", "Figure3", "Figure4",
    "FinalCheckpoint", "IgnoredEntry", "Manifest", "MeanSd", "Metrics", "Neighbour", "Part", "Pca", "PixelStats",
    "Query", "Record", "RecordedInput", "RepairedImage", "RunClasses", "RunInputs", "RunSettings", "RunSpec",
    "SeedFactor", "ShardEntry", "ShardIndex", "ShardParams", "ShardUnit", "SkippedImage", "StageMarker",
    "StagePlan", "StepRecord", "SweepRun", "SweepTable", "Topology", "TowerKernels", "ValRef", "VariantRow",
    "absent_when_none", "build", "parse_metrics", "read_metrics", "to_plain",
]
