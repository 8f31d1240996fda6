"""Stage `train`: the paper's AlexNet on the shards; resumable, distributed (torchrun), cached.

The run folder holds checkpoints/, metrics.jsonl, _run.json (the settings its checkpoints belong to) and, when
the run has reached its last epoch / --max-steps, _stage.json. Rerunning the same command resumes from the highest
checkpoint; more --epochs extend a finished run; other settings are refused unless --force starts over.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pipeline.cache import MARKER, Input, Stage, canonical_json, read_json, write_json
from pipeline.checkpoints import CHECKPOINTS_DIR
from pipeline.cluster import placement, resolve_devices
from pipeline.config import AlexNetConfig, TrainConfig, upgrade_trajectory
from pipeline.errors import PipeError, Stopped
from pipeline.imagenet import ilsvrc2012_classes
from pipeline.shards import load_manifest
from stages import QuietReporter, Reporter

VERSION = 1
RUN_SETTINGS = "_run.json"


def run(train_dir: Path, val_dir: Path, pca_path: Path, out: Path, *, cfg: TrainConfig | None = None,
        model: AlexNetConfig | None = None, devices: str = "auto", force: bool = False,
        reporter: Reporter | None = None) -> dict | None:
    """Train with `model`'s and `cfg`'s settings (defaults: the paper's); fc8's size comes from the train manifest."""
    reporter = reporter or QuietReporter()
    cfg, model = cfg or TrainConfig(), model or AlexNetConfig()
    place = placement()
    if cfg.batch_size % place.world_size:
        raise PipeError(f"--batch-size {cfg.batch_size} (global) must divide evenly over {place.world_size} ranks")
    train_manifest, val_manifest = load_manifest(train_dir), load_manifest(val_dir)
    check_inputs(train_dir, train_manifest, val_dir, val_manifest, cfg)
    classes = class_table(train_manifest, val_manifest)
    for problem in val_class_problems(classes, val_manifest, val_dir):
        reporter.warn(problem)
    inputs = {"train": Input.of_stage(train_dir, "manifest.json"), "val": Input.of_stage(val_dir, "manifest.json"),
              "pca": Input.of_stage(pca_path.parent, pca_path.name)}
    model_config = replace(model, num_classes=train_manifest["num_classes_total"])
    trajectory = {"model": model_config.to_dict(), "train": cfg.trajectory(),
                  "inputs": {k: v.digest for k, v in inputs.items()}}
    stage = Stage("train", VERSION, out, {**trajectory, "epochs": cfg.epochs, "max_steps": cfg.max_steps}, inputs)
    if stage.up_to_date() and not force:
        reporter.info(f"train: up to date ({out})")
        return None

    import torch  # not before: an up-to-date run answers at once

    from pipeline.augment import load_pca, make_eval_loader, make_train_loader
    from pipeline.model import build_model
    from pipeline.speed import set_tf32
    from pipeline.train import Progress, fit

    started = time.time()
    device_list = resolve_devices(devices, place.local_rank, place.local_world_size)  # before the folder is claimed
    with stage.run_lock(exclusive=place.rank == 0):
        _claim_run_folder(out, trajectory, force, main_rank=place.rank == 0, pca_path=pca_path,
                          info=reporter.info if place.rank == 0 else _ignore)
        on_gpu = device_list[0].startswith("cuda")
        if on_gpu:
            torch.cuda.set_device(device_list[0])
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
            set_tf32(cfg.tf32)
        if place.distributed:
            import torch.distributed as dist

            # NCCL for the gradients on GPUs; gloo beside it for the CPU tensors (val counts, RNG states)
            dist.init_process_group("cpu:gloo,cuda:nccl" if on_gpu else "gloo")
        torch.manual_seed(cfg.seed)  # the initial weights: a fixed seed gives the same run, the same on every rank
        net = build_model(model_config, device_list)
        if cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        pca = load_pca(pca_path)
        common = {"crop": model_config.crop, "rank": place.rank, "world_size": place.world_size,
                  "device": device_list[0],
                  "num_threads": cfg.loader_threads, "loader": cfg.loader}
        train_loader = make_train_loader(train_dir, pca, cfg.batch_size // place.world_size, seed=cfg.seed,
                                         channels_last=cfg.channels_last, **cfg.augment, **common)
        val_loader = make_eval_loader(val_dir, pca, cfg.eval_batch_size, ten_crop=False, **common)
        extra = {"devices": device_list, "world_size": place.world_size, "mean": pca["mean"],
                 "eigvals": pca["eigvals"], "eigvecs": pca["eigvecs"],
                 "manifests": {k: v.digest for k, v in inputs.items()}, "classes": classes,
                 "val_classes": len(val_manifest["classes"])}
        reporter.info(f"train: {sum(p.numel() for p in net.parameters()):,} parameters on {','.join(device_list)}, "
                      f"rank {place.rank}/{place.world_size}, {len(train_loader)} steps/epoch, loader {cfg.loader}")
        with reporter.progress("train", total=min(cfg.epochs * len(train_loader), cfg.max_steps or 1 << 62)
                               ) as advance:
            done = {"step": 0}

            def on_step(step: int, total: int, rec: dict) -> None:
                advance(step - done["step"], f"epoch {rec['epoch']} loss {rec['loss']:.3f} "
                                             f"{rec['images_per_s']:.0f} img/s")
                done["step"] = step

            def on_epoch(rec: dict) -> None:
                reporter.info(f"epoch {rec['epoch']}: val top-1 error {rec['val_top1_error']:.4f}, top-5 "
                              f"{rec['val_top5_error']:.4f} ({rec['val_samples']} images), lr {rec['lr']:g}")

            main = place.rank == 0
            result = fit(net, model_config.to_dict(), cfg, train_loader, val_loader, out, place,
                         Progress(on_step, on_epoch, reporter.info if main else _ignore,
                                  reporter.warn if main else _ignore), extra_config=extra)
        if place.distributed:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
        if place.rank == 0 and not result["stopped"]:
            stage.finalize(lambda: None, started=started, extra={"final": result})
    if result["stopped"]:  # on every rank: none goes on to what follows a finished run
        raise Stopped(f"train: stopped at step {result['step']} ({result['stopped']}), rerun to resume "
                      f"→ {result['checkpoint']}", result["stopped"])
    if place.rank == 0:
        reporter.info(f"train: step {result['step']}, epoch {result['epoch']} → {result['checkpoint']}")
    return result


def _ignore(message: str) -> None:
    """Ranks other than 0 stay quiet (rank 0 speaks for the run)."""


def check_inputs(train_dir: Path, train_manifest: dict, val_dir: Path, val_manifest: dict, cfg: TrainConfig) -> None:
    """What can be refused before the run folder is claimed (so that the corrected command is not refused as "other
    settings"): each shard folder holds its split, and the data holds at least one global batch."""
    for flag, folder, manifest, split in (("--train", train_dir, train_manifest, "train"),
                                          ("--val", val_dir, val_manifest, "val")):
        if manifest.get("split") != split:
            raise PipeError(f"{flag} {folder}: expected {split} shards, found split {manifest.get('split')!r} in its "
                            "manifest.json")
    if train_manifest["samples"] < cfg.batch_size:
        raise PipeError(f"{train_dir} holds {train_manifest['samples']} samples, fewer than one global batch "
                        f"(--batch-size {cfg.batch_size})")


def class_table(train_manifest: dict, val_manifest: dict) -> dict:
    """The name of every output (index → wnid and name, for num_classes_total outputs), stored in the checkpoint:
    the built-in ILSVRC-2012 list when the shards used it, else what the manifests name ("" for the rest)."""
    total = train_manifest["num_classes_total"]
    if train_manifest.get("params", {}).get("classes", "ilsvrc2012") == "ilsvrc2012" and total == 1000:
        builtin = ilsvrc2012_classes()
        wnids, names = list(builtin.wnids), list(builtin.names)
    else:
        wnids, names = [""] * total, [""] * total
    for entry in train_manifest["classes"] + val_manifest["classes"]:
        if entry["index"] < total and not wnids[entry["index"]]:
            wnids[entry["index"]], names[entry["index"]] = entry["wnid"], entry["name"]
    return {"wnids": wnids, "names": names, "trained": [c["index"] for c in train_manifest["classes"]]}


def val_class_problems(classes: dict, val_manifest: dict, val_dir: Path) -> list[str]:
    """Refuse val shards whose (index, wnid) differ from the model's class table (made with another class list),
    naming the first difference; the warnings for val classes the model never trained on."""
    wnids, trained = classes["wnids"], set(classes.get("trained", range(len(classes["wnids"]))))
    for entry in val_manifest["classes"]:
        index, wnid = entry["index"], entry["wnid"]
        model_wnid = wnids[index] if index < len(wnids) else None
        if model_wnid != wnid:
            found = f"{model_wnid}" if model_wnid is not None else f"no output {index} ({len(wnids)} outputs)"
            raise PipeError(f"{val_dir}: val class {index} is {wnid} but the model's class {index} is {found}; "
                            "expected val shards made with the class list of the training shards (--classes)")
    untrained = [e["wnid"] for e in val_manifest["classes"] if e["index"] not in trained]
    if untrained:
        return [f"{val_dir}: {len(untrained)} val class(es) the model never trained on (first: {untrained[0]}); "
                "they count as errors"]
    return []


def _claim_run_folder(out: Path, trajectory: dict, force: bool, main_rank: bool, pca_path: Path,
                      info: Callable[[str], None]) -> None:
    """Checkpoints are resumed only by the settings that made them. One exception: a pca.json whose digest changed
    while its numbers did not (pca-stats' VERSION 2 recomputed the eigen-pairs without BLAS: the same PCA to
    ~1e-16, new bytes) is adopted, so a run in progress continues instead of starting over."""
    path = out / RUN_SETTINGS
    digest = hashlib.sha256(canonical_json(trajectory).encode()).hexdigest()[:16]
    old = upgrade_trajectory(read_json(path)["settings"]) if path.is_file() else trajectory
    if old != trajectory and not force:
        changed = sorted(_diff(old, trajectory))
        adopted = _recomputed_pca(out, pca_path) if changed == ["inputs.pca"] else None
        if adopted is None:
            raise PipeError(f"{out} holds a run with other settings (changed: {', '.join(changed)}); "
                            "use another --out, or --force to start this run over")
        info(adopted)
    if not main_rank:
        return
    if force:
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / MARKER).unlink(missing_ok=True)
    (out / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": digest, "settings": trajectory})


def _recomputed_pca(out: Path, pca_path: Path) -> str | None:
    """Why this run may go on with `pca_path` although its digest is not the run's: its mean and eigen-pairs equal
    those in the run's newest checkpoint to PCA_SAME_TOL (or no checkpoint exists yet). None: they differ."""
    from pipeline.checkpoints import latest_checkpoint, load_checkpoint
    from pipeline.pca import PCA_SAME_TOL, load_pca, pca_difference

    checkpoint = latest_checkpoint(out / CHECKPOINTS_DIR)
    new = load_pca(pca_path)
    if checkpoint is not None:
        difference = pca_difference(load_checkpoint(checkpoint)["config"], new)
        if difference > PCA_SAME_TOL:
            return None
        said = (f"its mean and eigen-pairs equal those {checkpoint.name} trained with (largest difference "
                f"{difference:.1g})")
    else:
        said = "no checkpoint was written with the old one"
    return (f"train: {pca_path} is not the file this run started with, but {said}: the run goes on with it "
            "(pca-stats recomputes the same PCA in bits that no longer depend on the CPU)")


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if a != b else []
