"""Checkpoint files of a run: `checkpoints/step-%09d.pt`, written atomically, the last K kept.

Finding a run's newest checkpoint needs no torch (an up-to-date `eval` answers at once); saving and loading import
it when called. A checkpoint is a plain dict loadable with `torch.load(weights_only=True)` (see pipeline/train.py).
"""

from __future__ import annotations

import io
from pathlib import Path

from pipeline.cache import atomic_write

CHECKPOINTS_DIR = "checkpoints"  # inside a run folder
CHECKPOINT_GLOB = "step-*.pt"


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.pt"


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint files in `folder`, oldest step first."""
    return sorted(folder.glob(CHECKPOINT_GLOB)) if folder.is_dir() else []


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Atomic write, then keep only the `keep` highest steps."""
    import torch

    path = checkpoint_path(folder, step)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())
    for old in checkpoints(folder)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
