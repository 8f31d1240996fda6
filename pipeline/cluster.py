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
    local_world_size: int = 1  # ranks on this node

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def placement() -> Placement:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE; a bare process is rank 0 of 1."""
    env = os.environ
    return Placement(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                     int(env.get("LOCAL_WORLD_SIZE", 1)))


def resolve_devices(spec: str, local_rank: int = 0, local_world_size: int = 1,
                    cuda_devices: int | None = None) -> list[str]:
    """`--devices`: "auto", or a comma list such as "cuda:0,cuda:1", "cuda:0", "cpu" or "cpu,cpu".

    auto: with K ranks on a node of n GPUs, local rank r gets GPUs 2r and 2r+1 for the two towers when n >= 2K, else
    GPU r for both when n >= K, else (no GPU) the CPU; ranks never share a GPU (NCCL refuses that) and every rank
    gets the same layout (DDP needs it). One device holds both towers; two put tower A on the first, B on the
    second. An explicit CUDA list is one rank's map, so it is refused when several ranks share the node."""
    import torch

    n = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if spec == "auto":
        if n >= 2 * local_world_size:
            return [f"cuda:{2 * local_rank}", f"cuda:{2 * local_rank + 1}"]
        if n >= local_world_size:
            return [f"cuda:{local_rank}"]
        if n == 0:
            return ["cpu"]
        raise PipeError(f"auto: {local_world_size} ranks on this node but only {n} GPU(s); start at most {n} ranks "
                        f"per node (torchrun --nproc_per_node), or {n // 2 or 1} for two GPUs per rank",
                        option="devices")
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not 1 <= len(devices) <= 2:
        raise PipeError(f"expected one or two devices (the two towers), got {spec!r}", option="devices")
    try:
        parsed = [torch.device(d) for d in devices]
    except RuntimeError:
        raise PipeError(f"expected a list of devices such as cpu, cuda:0 or cuda:0,cuda:1, got {spec!r}",
                        option="devices") from None
    if len({dev.type for dev in parsed}) > 1:  # the towers' non-blocking copies need devices of one kind
        raise PipeError(f"{spec}: both towers must be on devices of one type (e.g. cuda:0,cuda:1 or "
                        "cpu,cpu), got a mix", option="devices")
    for d, dev in zip(devices, parsed, strict=True):
        if dev.type == "cuda" and (dev.index or 0) >= n:
            raise PipeError(f"{d} requested but this machine has {n} CUDA device(s)", option="devices")
        if dev.type == "cuda" and local_world_size > 1:
            raise PipeError(f"{spec}: {local_world_size} ranks on this node would all use {d}; with "
                            "several ranks per node use auto (each rank takes its own GPUs)", option="devices")
    return devices


def summed(values: list[float], place: Placement) -> list[float]:
    """`values` summed over every rank (float64: exact for counts)."""
    import torch

    counts = torch.tensor(values, dtype=torch.float64)
    if place.distributed:
        import torch.distributed as dist

        dist.all_reduce(counts)
    return counts.tolist()


def broadcast(value, place: Placement):
    """Rank 0's `value` on every rank."""
    if not place.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
