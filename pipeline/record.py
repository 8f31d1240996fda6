"""What a run ran on: the software (Python, torch, torchvision, DALI, CUDA, cuDNN, the Pillow build), the hardware
(GPU names, CPUs), the project's git commit and the command line. A figure in a report can then be traced to the
versions that made it. Recorded beside results, never in a cache key (a new torch must not redo a 50 GB shard).

`runs/<run>/events.jsonl` gets one line per start or resume of a training run (time, step, the checkpoint resumed
from, totals, this record), so an interrupted and resumed run shows where it stopped. `python -m pipeline.record`
prints the record (the GPU check script calls it).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pipeline.records import EVENTS, CodeDiff, Event, GitCommit, PillowBuild, RunRecord

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _dali_version() -> str | None:
    try:
        import nvidia.dali

        return nvidia.dali.__version__
    except ImportError:
        return None


def _git_commit(root: Path | None = None) -> GitCommit | None:
    """The checkout's commit and whether files differ from it; None when not run from a git checkout."""
    root = root or PROJECT_ROOT
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return GitCommit(head, bool(dirty))


CODE_DIRS = ("pipeline", "stages", "cli", "bench", "cluster", "tools")  # where an untracked file is code that ran


def code_diff(root: Path | None = None) -> bytes:
    """What the checkout's code differs from its commit by, as `git diff --binary` writes it: the tracked files'
    changes and the untracked files under CODE_DIRS as additions (empty when the code is its commit, or not a git
    checkout). Applied to the commit with `git apply`, it rebuilds the code that ran."""
    root = root or PROJECT_ROOT
    if not (root / ".git").exists():
        return b""

    def git(*args: str, ok: tuple[int, ...] = (0,)) -> bytes:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=30)
        if out.returncode not in ok:
            raise subprocess.SubprocessError(out.stderr.decode(errors="replace"))
        return out.stdout

    try:
        diff = git("diff", "--binary", "HEAD")
        untracked = git("ls-files", "--others", "--exclude-standard", "-z", "--", *CODE_DIRS).split(b"\0")
        for name in filter(None, untracked):  # `git diff --no-index` exits 1 when the files differ
            diff += git("diff", "--binary", "--no-index", "--", "/dev/null", name.decode(), ok=(0, 1))
    except (OSError, subprocess.SubprocessError):
        return b""
    return diff


def run_record() -> RunRecord:
    """Software, hardware, code version and command line of this process."""
    import PIL
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    return RunRecord(
        python=platform.python_version(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        dali=_dali_version(),
        cuda=torch.version.cuda if cuda else None,
        cudnn=torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None,
        pillow=PillowBuild(PIL.__version__, PIL.__version__.endswith("+simd")),
        gpus=tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else (),
        cpus=os.cpu_count(),
        cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        platform=platform.platform(),
        host=platform.node(),
        git=_git_commit(),
        command=shlex.join(sys.argv),
    )


def append_event(run_dir: Path, event: str, **fields) -> Event:
    """One line in `run_dir/events.jsonl`: the time, what happened (`event`: start, resume), `fields` (step,
    resumed_from, …) and the run record, written whole or not at all (a full disk is one line naming the file)."""
    from pipeline.engine import append_line, atomic_write

    record = run_record()
    diff = code_diff() if record.git else b""
    if diff:  # uncommitted code: keep what it differed by, so that the run can be rebuilt
        digest = hashlib.sha256(diff).hexdigest()
        path = run_dir / f"code-{digest[:16]}.diff"
        if not path.is_file():
            with atomic_write(path) as f:
                f.write(diff)
        fields["code_diff"] = CodeDiff(path.name, digest)
    line = Event(time=round(time.time(), 3), event=event, record=record, **fields)
    append_line(run_dir / EVENTS, json.dumps(line.to_json()))
    return line


def read_events(run_dir: Path) -> list[Event]:
    path = run_dir / EVENTS
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(Event.from_json(json.loads(line)))
        except (ValueError, TypeError):  # a line torn by a crash mid-write
            continue
    return events


if __name__ == "__main__":
    print(json.dumps(run_record(), indent=1))
