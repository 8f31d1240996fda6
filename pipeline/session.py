"""Where a process trains: its place in the job (rank, world size), its devices, and the process-wide set-up that
goes with them (the CUDA device, cuDNN's autotuner, TF32, the process group), taken down when the work is done."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.cluster import Placement, placement, resolve_devices


@dataclass(frozen=True)
class Session:
    place: Placement
    devices: tuple[str, ...]  # the towers' devices on this rank (one or two)

    @property
    def main(self) -> bool:
        """Rank 0 speaks for the run: it logs, writes checkpoints and the done marker."""
        return self.place.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.devices[0].startswith("cuda")

    def barrier(self) -> None:
        if self.place.distributed:
            import torch.distributed as dist

            dist.barrier()


def resolve_session_devices(devices: str) -> tuple[Placement, tuple[str, ...]]:
    """This rank's placement and device map (checked before anything is claimed: a wrong --devices costs nothing)."""
    place = placement()
    return place, tuple(resolve_devices(devices, place.local_rank, place.local_world_size))


@contextlib.contextmanager
def open_session(devices: str, *, tf32: bool = True) -> Iterator[Session]:
    """Set up this process for training on `devices` (a --devices spec); on leaving normally, wait for every rank
    and take the process group down (after an error each rank leaves on its own: a barrier could hang)."""
    import torch

    from pipeline.speed import set_tf32

    place, device_map = resolve_session_devices(devices)
    session = Session(place, device_map)
    if session.on_gpu:
        torch.cuda.set_device(device_map[0])
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        set_tf32(tf32)
    if place.distributed:
        import torch.distributed as dist

        # NCCL for the gradients on GPUs; gloo beside it for the CPU tensors (val counts, RNG states)
        dist.init_process_group("cpu:gloo,cuda:nccl" if session.on_gpu else "gloo")
    yield session
    if place.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
