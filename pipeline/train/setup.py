"""Setting a run up: what it trains on (`RunData`, checked before the run folder is claimed), where this process
trains (`Session`: rank, devices, the process group) and the placed net with this rank's loaders (`prepare`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cluster import Placement, placement, resolve_devices
from pipeline.config import AlexNetConfig, TrainConfig
from pipeline.engine import Input
from pipeline.errors import PipeError
from pipeline.records import MANIFEST, Manifest, Pca, RunClasses, RunInputs, RunSpec
from pipeline.sources import run_classes, val_class_problems
from pipeline.train.state import topology

if TYPE_CHECKING:
    import torch

    from pipeline.augment.loading import TrainEpochs
    from pipeline.model import AlexNet


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
    def open(cls, train_dir: Path, val_dir: Path, pca_path: Path, cfg: TrainConfig, crop: int) -> RunData:
        """What can be refused before the run folder is claimed (so that the corrected command is not refused as
        "other settings"): each shard folder holds its split, the data holds a global batch that the ranks can
        share, the val shards use the training shards' class list and short side, the crop fits in it."""
        place = placement()
        if cfg.batch_size % place.world_size:
            raise PipeError(f"{cfg.batch_size} (global) must divide evenly over {place.world_size} ranks",
                            option="batch_size")
        train = Manifest.read(train_dir).require_split("train", train_dir, option="train")
        val = Manifest.read(val_dir).require_split("val", val_dir, option="val")
        side = train.params.short_side
        if val.params.short_side != side:
            raise PipeError(f"{val_dir}: expected val shards of the training shards' short side {side}, found "
                            f"{val.params.short_side}; shard val with --short-side {side}", option="val")
        if crop > side:
            raise PipeError(f"expected a crop of at most the short side of the training shards {train_dir} ({side}), "
                            f"found {crop}; train with a smaller --crop or shard with a larger --short-side",
                            option="crop")
        if train.samples < cfg.batch_size:
            raise PipeError(f"{train_dir} holds {train.samples} samples, fewer than one global batch "
                            f"({cfg.batch_size})", option="batch_size")
        classes = run_classes(train, val)
        warnings = tuple(val_class_problems(classes, val, val_dir, untrained_allowed=cfg.untrained_val_classes))
        inputs = {"train": Input.of_stage(train_dir, MANIFEST), "val": Input.of_stage(val_dir, MANIFEST)}
        inputs["pca"] = pca_input(pca_path, train_dir, inputs["train"], cfg.pca_from_elsewhere)
        return cls(train_dir, val_dir, pca_path, train, val, classes, inputs, place, warnings)


def pca_input(pca_path: Path, train_dir: Path, train: Input, from_elsewhere: bool) -> Input:
    """pca.json as a run's input: computed by pca-stats from these training shards (its source_manifest_sha256 is
    their manifest's), unless `from_elsewhere` allows another (published values, a PCA of other data)."""
    source = Pca.read(pca_path).source_manifest_sha256
    ours = train.digest.removeprefix("sha256:")
    if from_elsewhere:
        return Input.of_file(pca_path)
    if source != ours:
        raise PipeError(f"{pca_path}: expected the PCA of the training shards {train_dir} (manifest sha256 "
                        f"{ours[:12]}…), found the PCA of other shards (manifest sha256 {source[:12] or 'none'}…); "
                        "run pca-stats on the training shards, or add --pca-from-elsewhere to train with it anyway",
                        option="pca")
    return Input.of_stage(pca_path.parent, pca_path.name)


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

    from pipeline.train.speed import set_tf32

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


@dataclass
class Job:
    """A run ready to fit on this rank: the placed net, this rank's loaders and the spec its checkpoints carry."""

    net: AlexNet
    train_loader: TrainEpochs
    val_loader: object
    spec: RunSpec
    session: Session

    def describe(self) -> str:
        place, cfg = self.session.place, self.spec.train
        from pipeline.model import count_parameters

        return (f"train: {count_parameters(self.net):,} parameters on {','.join(self.session.devices)}, rank "
                f"{place.rank}/{place.world_size}, {len(self.train_loader)} steps/epoch, loader {cfg.loader}")

    @property
    def total_steps(self) -> int:
        cfg = self.spec.train
        return min(cfg.epochs * len(self.train_loader), cfg.max_steps or 1 << 62)


def prepare(model: AlexNetConfig, cfg: TrainConfig, data: RunData, session: Session) -> Job:
    """The net from the seeded initial weights (the same on every rank), placed on this rank's devices; the loaders
    of this rank's part of each epoch with pca.json's pixel statistics; the run's spec."""
    import torch

    from pipeline.augment import make_eval_loader, make_train_loader
    from pipeline.model import build_model
    torch.manual_seed(cfg.seed)  # the initial weights (pipeline.model.initial_model draws the same)
    net = build_model(model, session.devices)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    pixels = Pca.read(data.pca_path).stats
    place = session.place
    common: dict[str, Any] = {"crop": model.crop, "rank": place.rank, "world_size": place.world_size,
                              "device": session.devices[0], "num_threads": cfg.loader_threads, "loader": cfg.loader}
    workers: dict[str, Any] = {"workers": cfg.loader_workers} if cfg.loader == "dali" else {}
    train_loader = make_train_loader(data.train_dir, pixels, cfg.batch_size // place.world_size, seed=cfg.seed,
                                     channels_last=cfg.channels_last, random_crop=cfg.random_crop, mirror=cfg.mirror,
                                     lighting=cfg.lighting, **workers, **common)
    val_loader = make_eval_loader(data.val_dir, pixels, cfg.eval_batch_size, ten_crop=False, **common)
    spec = RunSpec(model=model, train=cfg, pixels=pixels, classes=data.classes, inputs=data.digests,
                   val_classes=len(data.val.classes), topology=topology(cfg, place), devices=session.devices,
                   short_side=data.train.params.short_side)
    return Job(net, train_loader, val_loader, spec, session)


def wrap_model(model: torch.nn.Module, spec: RunSpec, place: Placement):
    """What a step calls: the model, in DDP across ranks (BatchNorm synchronised over them on GPUs, so that its
    statistics are the global batch's; gloo has no SyncBatchNorm, so on the CPU each rank normalises its own
    part), compiled when asked."""
    import torch

    net = model
    if place.distributed:
        from torch.nn.parallel import DistributedDataParallel

        first = next(model.parameters()).device
        if spec.model.norm == "batch" and first.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        single = len({p.device for p in model.parameters()}) == 1 and first.type == "cuda"
        net = DistributedDataParallel(net, device_ids=[first] if single else None)
    return torch.compile(net) if spec.train.compile else net
