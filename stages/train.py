"""Stage `train`: the paper's AlexNet on the shards; resumable, distributed (torchrun), cached.

The run folder holds checkpoints/, metrics.jsonl, events.jsonl, _run.json (the settings its checkpoints belong to)
and, when the run has reached its last epoch / --max-steps, _stage.json. Rerunning the same command resumes from the
highest checkpoint; more --epochs extend a finished run; other settings are refused unless --force starts over.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.config import AlexNetConfig, TrainConfig
from pipeline.engine import QuietReporter, Reporter, Stage, StageResult
from pipeline.errors import Diverged, PeerLost, Stopped
from pipeline.records import CHECKPOINTS_DIR, DIVERGED, FinalCheckpoint
from pipeline.train.checkpoints import latest_checkpoint
from pipeline.train.setup import RunData
from pipeline.train.state import RunIdentity, diverged_record, final_checkpoint_problem, run_trajectory

VERSION = 1


def run(train_dir: Path, val_dir: Path, pca_path: Path, out: Path, *, cfg: TrainConfig | None = None,
        model: AlexNetConfig | None = None, devices: str = "auto", force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    """Train with `model`'s and `cfg`'s settings (defaults: the paper's); fc8's size comes from the train manifest.
    The product is the `pipeline.train.Outcome` of this start (None when the run was already finished)."""
    reporter = reporter or QuietReporter()
    cfg, model = cfg or TrainConfig(), model or AlexNetConfig()
    data = RunData.open(train_dir, val_dir, pca_path, cfg, model.crop)  # refused here, before the run folder is claimed
    for warning in data.warnings:
        reporter.warn(warning)
    model = replace(model, num_classes=data.train.num_classes_total)
    trajectory = run_trajectory(model, cfg, data.inputs)
    stage = Stage("train", VERSION, out, {**trajectory, "epochs": cfg.epochs, "max_steps": cfg.max_steps},
                  data.inputs)
    problem: list[str] = []  # why a finished run is not done after all (its final checkpoint damaged or gone)

    def final_checkpoint_damaged() -> list[str]:
        problem[:] = [p] if (p := final_checkpoint_problem(out, stage.marker())) else []
        return problem

    return stage.execute(lambda: _train(stage, data, model, cfg, trajectory, pca_path, devices, force, problem,
                                        reporter),
                         say=reporter, force=force, exclusive=data.place.rank == 0, explain=False,
                         damaged=final_checkpoint_damaged)


def _train(stage: Stage, data: RunData, model: AlexNetConfig, cfg: TrainConfig, trajectory: dict, pca_path: Path,
           devices: str, force: bool, problem: list[str], reporter: Reporter) -> StageResult:
    """Claim the run folder, set the run up on this rank's devices and fit it (resuming where it stopped)."""
    out = stage.out
    if problem:
        reporter.warn(f"train: {out} finished, but {problem[0]}: resuming from the newest good checkpoint to the end")
        stage.reopen([])  # not done: the done marker goes, the run's checkpoints stay
    diverged = diverged_record(out)
    if diverged is not None and not force:  # the same settings would diverge again
        raise Diverged(f"train: {out} diverged at step {diverged.step} (its {DIVERGED}); rerun with a lower --lr "
                       "and --force", step=diverged.step)

    from pipeline.train.setup import (
        open_session,  # torch: not before, an up-to-date run answers at once
        prepare,
    )

    with open_session(devices, tf32=cfg.tf32) as session:
        say = reporter if session.main else QuietReporter()  # rank 0 speaks for the run
        RunIdentity(trajectory).claim(out, force, session.main, pca_path, say.info)
        job = prepare(model, cfg, data, session)
        try:
            outcome = _fit(job, out, say, reporter)
        except RuntimeError as e:  # gloo/NCCL: a collective whose peer is gone
            if not session.place.distributed or (why := peer_lost(e)) is None:
                raise
            newest = latest_checkpoint(out / CHECKPOINTS_DIR)
            raise PeerLost(f"train: rank {session.place.rank} of {session.place.world_size} lost another rank "
                           f"({why}); nothing is lost: rerun the same command to resume "
                           + (f"from {newest}" if newest else "from the start")) from None
        if session.main and outcome.stopped is None:
            final = FinalCheckpoint(outcome.epoch, outcome.step, outcome.checkpoint, outcome.stopped,
                                    Path(outcome.checkpoint).stat().st_size)
            stage.finalize(lambda: None, final=final)
    if outcome.stopped:  # on every rank: none goes on to what follows a finished run
        raise Stopped(f"train: stopped at step {outcome.step} ({outcome.stopped}), rerun to resume "
                      f"→ {outcome.checkpoint}", outcome.stopped)
    say.info(f"train: step {outcome.step}, {outcome.epoch} epochs done → {outcome.checkpoint}")
    return StageResult("train", out, finished=True, product=outcome)


def _fit(job, out: Path, reporter: Reporter, every_rank: Reporter):
    """`fit` with a progress bar (loss and images/s) and a line per epoch; every rank says where it runs."""
    from pipeline.train.loop import Progress, fit

    with reporter.progress("train", total=job.total_steps) as advance:
        done = {"step": 0}

        epochs = job.spec.train.epochs  # epochs are counted from 1 where a person reads them

        def on_step(step: int, total: float, rec) -> None:
            advance(step - done["step"], f"epoch {rec.epoch + 1}/{epochs} loss {rec.loss:.3f} "
                                         f"{rec.images_per_s:.0f} img/s")
            done["step"] = step

        def on_epoch(rec) -> None:
            reporter.info(f"epoch {rec.epoch + 1}/{epochs}: val top-1 error {rec.val_top1_error:.4f}, top-5 "
                          f"{rec.val_top5_error:.4f} ({rec.val_samples} images), lr {rec.lr:g}")

        return fit(job.net, job.spec, job.train_loader, job.val_loader, out, job.session.place,
                   Progress(lambda: every_rank.info(job.describe()), on_step, on_epoch, reporter.info, reporter.warn))


def peer_lost(e: BaseException) -> str | None:
    """What in a collective's error says another rank went away (gloo: the connection reset or closed by the peer;
    NCCL: the communicator aborted or a remote process exited), or None."""
    text = str(e)
    return next((s for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                             "remote process exited", "NCCL communicator was aborted", "Connection refused")
                 if s in text), None)
