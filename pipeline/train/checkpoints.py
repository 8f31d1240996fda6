"""Checkpoint files of a run: `checkpoints/step-%09d.pt`, written atomically, the last K kept, each with its sha256
beside it (`step-%09d.pt.sha256`) so that a damaged copy is found before torch reads it.

Finding a run's newest checkpoint needs no torch (an up-to-date `eval` answers at once); saving and loading import
it when called. A checkpoint is a plain dict loadable with `torch.load(weights_only=True)` (`TrainCheckpoint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.engine import atomic_write, finished_marker, sha256_file
from pipeline.errors import PipeError
from pipeline.records import CHECKPOINTS_DIR, DIVERGED, LoaderPosition, RunSpec

CHECKPOINT_GLOB = "step-*.pt"
DIGEST_SUFFIX = ".sha256"  # the sidecar: the checkpoint's sha256 in hex, written after it
DAMAGED_SUFFIX = ".damaged"  # a checkpoint that failed its check, set aside (never deleted: it may be evidence)


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.pt"


def checkpoint_step(checkpoint: Path) -> int:
    """The step in a checkpoint's name (step-%09d.pt)."""
    return int(checkpoint.name.removeprefix("step-").split(".")[0])


def digest_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + DIGEST_SUFFIX)


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint files in `folder`, oldest step first."""
    return sorted(folder.glob(CHECKPOINT_GLOB)) if folder.is_dir() else []


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Atomic write, then its digest beside it, then keep only the `keep` highest steps."""
    import torch

    path = checkpoint_path(folder, step)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())
    with atomic_write(digest_path(path), "w") as f:
        f.write(hashlib.sha256(buffer.getbuffer()).hexdigest() + "\n")
    for old in checkpoints(folder)[:-keep]:
        old.unlink()
        digest_path(old).unlink(missing_ok=True)
    remember_verdict(path, path.stat(), good=True)  # just written from these bytes: a rerun need not hash it
    return path


class CheckpointGone(PipeError):
    """The checkpoint was deleted between finding it and reading it: its run rotated it away."""


ROTATED_AWAY = "rotated away"  # the file went while it was being checked: a run rotating its checkpoints


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from, or None. With a sidecar the check is its digest (no torch); a checkpoint
    written before sidecars existed is checked by reading it whole. `ROTATED_AWAY` when it no longer exists."""
    sidecar = digest_path(path)
    try:
        if sidecar.is_file():
            expected, found = sidecar.read_text().strip(), sha256_file(path)
            return None if found == expected else f"sha256 {found[:12]}… differs from the recorded {expected[:12]}…"
        if not path.is_file():
            return ROTATED_AWAY
        load_checkpoint(path)
    except FileNotFoundError:
        return ROTATED_AWAY
    except PipeError as e:
        return ROTATED_AWAY if not path.exists() else str(e).removeprefix(f"{path}: ")
    return None


VERDICTS = ".verified.json"  # beside the checkpoints: name → [size, mtime_ns, sha256 matched]


def verifies(path: Path) -> bool:
    """Whether `path` matches the sha256 beside it (no sidecar: whether torch reads it), the verdict cached by the
    file's size and mtime: `status` and an up-to-date `train` hash a 0.5 GB checkpoint once, not on every call."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    verdicts = _verdicts(path.parent)
    seen = verdicts.get(path.name)
    if isinstance(seen, list) and seen[:2] == [stat.st_size, stat.st_mtime_ns]:
        return bool(seen[2])
    good = checkpoint_problem(path) is None
    remember_verdict(path, stat, good, verdicts)
    return good


def _verdicts(folder: Path) -> dict[str, list]:
    try:
        return json.loads((folder / VERDICTS).read_text())
    except (OSError, ValueError):  # none yet, or unreadable: every verdict is recomputed
        return {}


def remember_verdict(path: Path, stat: os.stat_result, good: bool, verdicts: dict | None = None) -> None:
    """Keep `path`'s verdict in the cache beside it (entries of deleted checkpoints dropped)."""
    verdicts = {k: v for k, v in (_verdicts(path.parent) if verdicts is None else verdicts).items()
                if (path.parent / k).exists()}
    verdicts[path.name] = [stat.st_size, stat.st_mtime_ns, good]
    with contextlib.suppress(OSError, PipeError):  # a read-only disk: the verdict is not kept, only recomputed
        with atomic_write(path.parent / VERDICTS, "w") as f:
            json.dump(verdicts, f)


def newest_verified(folder: Path) -> Path | None:
    """The newest checkpoint that verifies, found without changing anything (for `status`)."""
    return next((p for p in reversed(checkpoints(folder)) if verifies(p)), None)


def newest_good_checkpoint(folder: Path, warn: Callable[[str], None]) -> Path | None:
    """Walk back from the newest checkpoint to the newest that verifies; each damaged one on the way is one
    warning and is renamed *.damaged. None when the folder holds no checkpoint; an error when none is good (also
    when an earlier run set them all aside)."""
    found, kept_in_place = checkpoints(folder), 0
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if problem == ROTATED_AWAY:  # a training run deleted it after listing: the one before is the newest now
            continue
        set_aside = path.with_name(path.name + DAMAGED_SUFFIX)
        try:
            path.rename(set_aside)
            digest_path(path).unlink(missing_ok=True)
        except OSError as e:  # a read-only disk: say so and go on without renaming
            warn(f"checkpoint {path} is damaged ({problem}) and cannot be set aside ({e.strerror}); trying the "
                 "one before")
            kept_in_place += 1
            continue
        warn(f"checkpoint {path} is damaged ({problem}); set aside as {set_aside.name}, trying the one before")
    set_aside_count = len(list(folder.glob(CHECKPOINT_GLOB + DAMAGED_SUFFIX))) if folder.is_dir() else 0
    if set_aside_count or kept_in_place:  # also on a later run: a fresh start would silently drop the run
        counts = [f"{set_aside_count} set aside as *{DAMAGED_SUFFIX}"] * bool(set_aside_count) + \
            [f"{kept_in_place} damaged on a read-only disk"] * bool(kept_in_place)
        raise PipeError(f"{folder}: no checkpoint verifies ({', '.join(counts)}); "
                        "expected at least one good step-*.pt; restore one, or rerun with --force to start over")
    return None


def non_finite_tensors(weights: dict) -> list[str]:
    """The names of the tensors of a state dict holding nan or inf (a diverged run's weights)."""
    import torch

    return [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


@dataclass
class TrainCheckpoint:
    """What a checkpoint holds: the weights, the optimizer's and schedule's state (torch's state dicts), where the
    run stood (epoch, step, the loader's position, the epoch's logged losses and [top-1 mistakes, images] so far)
    and the run's spec (what the weights mean). On disk a plain dict `torch.load(weights_only=True)` reads."""

    model: dict
    optimizer: dict
    scheduler: dict
    epoch: int
    step: int
    loader: LoaderPosition
    spec: RunSpec
    epoch_losses: list[float] = field(default_factory=list)
    epoch_mistakes: list[int] = field(default_factory=lambda: [0, 0])

    @classmethod
    def from_state(cls, state: dict) -> TrainCheckpoint:
        """A loaded checkpoint dict (checkpoints written before the epoch's losses and mistakes were kept read as
        none so far)."""
        return cls(state["model"], state.get("optimizer", {}), state.get("scheduler", {}), state["epoch"],
                   state["step"], LoaderPosition.from_json(state["loader"]), RunSpec.of_checkpoint(state),
                   list(state.get("epoch_losses", [])), list(state.get("epoch_mistakes", [0, 0])))

    def to_state(self) -> dict:
        """The dict torch.save writes."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "epoch": self.epoch,
                "step": self.step, "loader": self.loader.to_json(), "epoch_losses": self.epoch_losses,
                "epoch_mistakes": self.epoch_mistakes, "config": self.spec.to_json()}


def load_checkpoint(path: Path) -> TrainCheckpoint:
    """The checkpoint in `path`; a file torch cannot read (truncated, not a checkpoint) is a one-line error."""
    import pickle
    import zipfile

    if not path.exists():
        raise CheckpointGone(f"{path}: expected a checkpoint, found none (deleted: its run keeps only the newest)")
    if path.is_file() and not zipfile.is_zipfile(path):  # what torch.save writes; torch's own words are misleading
        raise PipeError(f"{path}: expected a checkpoint written by `alexnet-pipe train`, found a file that is not a "
                        "complete zip archive (cut short, or not a checkpoint)")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointGone(f"{path}: expected a checkpoint, found none (deleted: its run keeps only the "
                             "newest)") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        # torch's first line can be a paragraph (weights_only's advice for any non-checkpoint): its first sentence
        reason = str(e).splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise PipeError(f"{path}: expected a checkpoint written by `alexnet-pipe train`, found an unreadable file "
                        f"({reason})") from None
    if not isinstance(state, dict) or not {"model", "config", "step"} <= set(state):
        found = f"a dict of {', '.join(map(str, list(state)[:5]))}" if isinstance(state, dict) else \
            f"a saved {type(state).__module__}.{type(state).__name__}"
        raise PipeError(f"{path}: expected a checkpoint written by `alexnet-pipe train`, found {found}")
    try:
        return TrainCheckpoint.from_state(state)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PipeError(f"{path}: expected a checkpoint written by `alexnet-pipe train`, found {type(e).__name__}: "
                        f"{e}") from None


def resolve_checkpoint(run_or_checkpoint: Path, warn: Callable[[str], None]) -> Path:
    """A run folder means its newest checkpoint that verifies (found by the digests beside them, without importing
    torch: an up-to-date eval and a wrong path return at once); a named file that does not verify is an error."""
    if run_or_checkpoint.is_file():  # without a digest beside it, reading it is the check (load_checkpoint)
        problem = checkpoint_problem(run_or_checkpoint) if digest_path(run_or_checkpoint).is_file() else None
        if problem:
            raise PipeError(f"{run_or_checkpoint}: expected a good checkpoint, found it damaged ({problem})")
        return run_or_checkpoint
    if (run_or_checkpoint / DIVERGED).is_file():  # its checkpoints are finite, but the run did not finish
        last = latest_checkpoint(run_or_checkpoint / CHECKPOINTS_DIR)
        raise PipeError(f"{run_or_checkpoint}: expected a finished run, found one that diverged (its {DIVERGED}); "
                        + (f"to use its last finite checkpoint anyway, name the file: {last}" if last else
                           "it wrote no checkpoint"))
    found = newest_good_checkpoint(run_or_checkpoint / CHECKPOINTS_DIR, warn)
    if found is None:
        raise PipeError(f"{run_or_checkpoint}: expected a checkpoint file or a run folder holding "
                        f"{CHECKPOINTS_DIR}/{CHECKPOINT_GLOB}")
    if why := _not_the_newest(run_or_checkpoint, found):
        warn(f"{run_or_checkpoint}: taking {found.name} (step {checkpoint_step(found)}), its newest checkpoint that "
             f"verifies: {why}")
    return found


def _not_the_newest(run: Path, found: Path) -> str | None:
    """Why a run folder's checkpoint is not its last one: a newer one set aside as damaged, or the final checkpoint
    its done marker names gone (None: it is the last)."""
    newer = sorted(p.name for p in (run / CHECKPOINTS_DIR).glob(CHECKPOINT_GLOB + DAMAGED_SUFFIX)
                   if checkpoint_step(p) > checkpoint_step(found))
    if newer:
        return f"the newer {', '.join(newer)} {'was' if len(newer) == 1 else 'were'} set aside as damaged"
    with contextlib.suppress(PipeError):
        marker = finished_marker(run)
        if marker is not None and marker.final is not None and marker.final.step > checkpoint_step(found):
            return f"the run's final checkpoint (step {marker.final.step}) is gone"
    return None
