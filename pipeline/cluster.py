"""Where this process sits in a job: rank, world size, local rank (torchrun or Slurm), and which devices it owns."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.errors import PipeError


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def placement() -> Placement:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a bare process is rank 0 of 1."""
    return Placement(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))


def resolve_devices(spec: str, local_rank: int = 0) -> list[str]:
    """`--devices`: "auto", or a comma list such as "cuda:0,cuda:1", "cuda:0", "cpu" or "cpu,cpu".

    auto: local rank r gets GPUs 2r and 2r+1 for the two towers when there are enough, else GPU r for both, else
    the CPU. One device holds both towers; two put tower A on the first and tower B on the second."""
    import torch

    if spec == "auto":
        n = torch.cuda.device_count()
        if n >= 2 * (local_rank + 1):
            return [f"cuda:{2 * local_rank}", f"cuda:{2 * local_rank + 1}"]
        if n > local_rank:
            return [f"cuda:{local_rank}"]
        return ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not 1 <= len(devices) <= 2:
        raise PipeError(f"--devices takes one or two devices (the two towers), got {spec!r}")
    for d in devices:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise PipeError(f"--devices: {d!r} is not a device (expected e.g. cpu, cuda:0)") from None
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise PipeError(f"--devices: {d} requested but this machine has {torch.cuda.device_count()} CUDA "
                            "device(s)")
    return devices
