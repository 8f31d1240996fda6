"""A training run's folder and inputs: what it trains on (checked before anything is claimed), the settings its
checkpoints belong to (`_run.json`), and the rule that only those settings resume them."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.classes import run_classes, val_class_problems
from pipeline.cluster import Placement, placement
from pipeline.config import AlexNetConfig, TrainConfig, upgrade_trajectory
from pipeline.engine import (
    MARKER,
    Input,
    canonical_json,
    changed_fields,
    describe_changes,
    read_json,
    sha256_file,
    write_json,
)
from pipeline.errors import PipeError
from pipeline.records import (
    CHECKPOINTS_DIR,
    DIVERGED,
    MANIFEST,
    METRICS,
    RUN_SETTINGS,
    CheckpointRef,
    Manifest,
    RunClasses,
    RunInputs,
)


@dataclass(frozen=True)
class RunData:
    """The shards and pca.json a run trains on, with their digests and the run's class table."""

    train_dir: Path
    val_dir: Path
    pca_path: Path
    train: Manifest
    val: Manifest
    classes: RunClasses
    inputs: dict[str, Input]  # train, val, pca: what the stage's key hashes
    place: Placement
    warnings: tuple[str, ...]  # val classes never trained on

    @property
    def digests(self) -> RunInputs:
        return RunInputs(**{name: i.digest for name, i in self.inputs.items()})

    @classmethod
    def open(cls, train_dir: Path, val_dir: Path, pca_path: Path, cfg: TrainConfig) -> RunData:
        """What can be refused before the run folder is claimed (so that the corrected command is not refused as
        "other settings"): each shard folder holds its split, the data holds a global batch that the ranks can
        share, the val shards use the training shards' class list."""
        place = placement()
        if cfg.batch_size % place.world_size:
            raise PipeError(f"{cfg.batch_size} (global) must divide evenly over {place.world_size} ranks",
                            option="batch_size")
        train = Manifest.read(train_dir).require_split("train", train_dir, option="train")
        val = Manifest.read(val_dir).require_split("val", val_dir, option="val")
        if train.samples < cfg.batch_size:
            raise PipeError(f"{train_dir} holds {train.samples} samples, fewer than one global batch "
                            f"({cfg.batch_size})", option="batch_size")
        classes = run_classes(train, val)
        warnings = tuple(val_class_problems(classes, val, val_dir))
        inputs = {"train": Input.of_stage(train_dir, MANIFEST), "val": Input.of_stage(val_dir, MANIFEST)}
        inputs["pca"] = pca_input(pca_path, train_dir, inputs["train"], cfg.pca_from_elsewhere)
        return cls(train_dir, val_dir, pca_path, train, val, classes, inputs, place, warnings)


def pca_input(pca_path: Path, train_dir: Path, train: Input, from_elsewhere: bool) -> Input:
    """pca.json as a run's input: computed by pca-stats from these training shards (its source_manifest_sha256 is
    their manifest's), unless `from_elsewhere` allows another (published values, a PCA of other data)."""
    from pipeline.pca import load_pca

    source = load_pca(pca_path).source_manifest_sha256
    ours = train.digest.removeprefix("sha256:")
    if from_elsewhere:
        return Input.of_file(pca_path)
    if source != ours:
        raise PipeError(f"{pca_path}: expected the PCA of the training shards {train_dir} (manifest sha256 "
                        f"{ours[:12]}…), found the PCA of other shards (manifest sha256 {source[:12] or 'none'}…); "
                        "run pca-stats on the training shards, or add --pca-from-elsewhere to train with it anyway",
                        option="pca")
    return Input.of_stage(pca_path.parent, pca_path.name)


def run_trajectory(model: AlexNetConfig, cfg: TrainConfig, inputs: dict[str, Input]) -> dict:
    """The settings a run's checkpoints belong to: the model, the result-changing training settings, the inputs."""
    return {"model": model.to_dict(), "train": cfg.trajectory(), "inputs": {k: v.digest for k, v in inputs.items()}}


def claim_run_folder(out: Path, trajectory: dict, force: bool, main_rank: bool, pca_path: Path,
                     info: Callable[[str], None]) -> None:
    """Checkpoints are resumed only by the settings that made them. One exception: a pca.json whose digest changed
    while its numbers did not (pca-stats' VERSION 2 recomputed the eigen-pairs without BLAS: the same PCA to
    ~1e-16, new bytes) is adopted, so a run in progress continues instead of starting over."""
    path = out / RUN_SETTINGS
    digest = hashlib.sha256(canonical_json(trajectory).encode()).hexdigest()[:16]
    old = upgrade_trajectory(read_json(path)["settings"]) if path.is_file() else trajectory
    if old != trajectory and not force:
        changed = changed_fields(old, trajectory)
        adopted = _recomputed_pca(out, pca_path) if changed == ["inputs.pca"] else None
        if adopted is None:
            raise PipeError(f"{out} holds a run with other settings ({describe_changes(old, trajectory)}); "
                            "use another --out, or --force to start this run over")
        info(adopted)
    if not main_rank:
        return
    if force:
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
        for name in (METRICS, MARKER, DIVERGED):
            (out / name).unlink(missing_ok=True)
    (out / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": digest, "settings": trajectory})


def final_checkpoint_problem(out: Path, marker: dict) -> str | None:
    """Why a finished run is not done after all: its final checkpoint (recorded in the done marker) is missing or
    not the size it was written with (set aside as damaged, cut, replaced). A stat, no hashing: the up-to-date
    check stays instant."""
    final = marker.get("final", {})
    path, size = final.get("checkpoint"), final.get("bytes")
    if not path:
        return None
    checkpoint = out / CHECKPOINTS_DIR / Path(path).name
    if not checkpoint.is_file():
        return f"its final checkpoint {checkpoint.name} is missing"
    if size is not None and checkpoint.stat().st_size != size:
        return f"its final checkpoint {checkpoint.name} is {checkpoint.stat().st_size:,} bytes, not {size:,}"
    return None


def diverged_record(out: Path) -> dict | None:
    """The run's _diverged.json (the step whose loss was not finite), when it diverged."""
    path = out / DIVERGED
    return read_json(path) if path.is_file() else None


def _recomputed_pca(out: Path, pca_path: Path) -> str | None:
    """Why this run may go on with `pca_path` although its digest is not the run's: its mean and eigen-pairs equal
    those in the run's newest checkpoint to PCA_SAME_TOL (or no checkpoint exists yet). None: they differ."""
    from pipeline.checkpoints import latest_checkpoint, load_checkpoint
    from pipeline.pca import PCA_SAME_TOL, load_pca, pca_difference
    from pipeline.records import RunSpec

    checkpoint = latest_checkpoint(out / CHECKPOINTS_DIR)
    new = load_pca(pca_path).stats
    if checkpoint is not None:
        difference = pca_difference(RunSpec.of_checkpoint(load_checkpoint(checkpoint)).pixels, new)
        if difference > PCA_SAME_TOL:
            return None
        said = (f"its mean and eigen-pairs equal those {checkpoint.name} trained with (largest difference "
                f"{difference:.1g})")
    else:
        said = "no checkpoint was written with the old one"
    return (f"train: {pca_path} is not the file this run started with, but {said}: the run goes on with it "
            "(pca-stats recomputes the same PCA in bits that no longer depend on the CPU)")


def eval_is_of_run(run: Path, evaluated: CheckpointRef) -> str | None:
    """Why an eval (its checkpoint's sha256) is not of this run, or None: its digest must be one of the run's
    checkpoints' (read from the digests beside them; a checkpoint without one is hashed)."""
    from pipeline.checkpoints import checkpoints, digest_path

    if not evaluated.sha256:
        return None  # an eval.json written before checkpoint digests were recorded: nothing to compare
    found = checkpoints(run / CHECKPOINTS_DIR)
    digests = {digest_path(p).read_text().strip() if digest_path(p).is_file() else sha256_file(p) for p in found}
    if evaluated.sha256 in digests:
        return None
    return (f"it evaluated {evaluated.path} (step {evaluated.step}, sha256 {evaluated.sha256[:12]}…), which is not "
            f"one of the {len(found)} checkpoint(s) of {run}")
