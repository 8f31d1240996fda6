"""Stage `ablate`: the baseline and one variant per claim of the paper, for several seeds, on the same shards; the
comparison table ablations.md / ablations.json and its plots.

Each (variant, seed) is a unit: an ordinary cached train run in runs/<variant>-seed<k>/ and its cached eval in
eval/<variant>-seed<k>/, so a rerun does nothing and a killed sweep resumes inside the run it was training. Array
tasks (--task-index/--num-tasks) share the folder; whichever finishes the last unit writes the table. The train and
eval stages it runs are handed in by the caller (stages never import each other).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from pipeline.board import BOARD, sweep_events
from pipeline.config import AlexNetConfig, TrainConfig, upgrade_trajectory
from pipeline.engine import Input, QuietReporter, Reporter, Stage, StageResult, atomic_write, task_slice, write_json
from pipeline.errors import Diverged, PipeError
from pipeline.experiments.claims import (
    VARIANT_NAMES,
    diverged_sweep_record,
    plot,
    summarize,
    sweep_record,
    sweep_units,
    switches,
    table_markdown,
    unit_name,
)
from pipeline.experiments.claims import variant_settings as settings_of
from pipeline.records import ABLATIONS, EVAL, MANIFEST, RUN_SETTINGS, Manifest, RunSettings, SweepRun
from pipeline.train.setup import pca_input
from pipeline.train.state import RunIdentity, run_trajectory

# 2: the ReLU-vs-tanh plot is training-error.png (figure1.png is `alexnet-pipe figure1`'s).
# 3: each run's eval also measures the training error as val's (the train–val gap): every unit is evaluated again;
# its train run is kept (up to date).
VERSION = 3
DEFAULT_SEEDS = 3


def run(train_dir: Path, val_dir: Path, pca_path: Path, out: Path, *, model: AlexNetConfig, cfg: TrainConfig,
        train_stage: Callable[..., StageResult], eval_stage: Callable[..., StageResult], recipe: str = "paper",
        seeds: int = DEFAULT_SEEDS, variants: tuple[str, ...] = VARIANT_NAMES, threshold: float = 0.5,
        ten_crop: bool = True, devices: str = "auto", task_index: int | None = None, num_tasks: int | None = None,
        force: bool = False, reporter: Reporter | None = None) -> StageResult:
    """Train (`train_stage`) and evaluate (`eval_stage`) every (variant, seed) of this task's slice; write the table
    once all units are done. The product is the table's summary."""
    reporter = reporter or QuietReporter()
    unknown = [v for v in variants if v not in VARIANT_NAMES]
    if unknown or "baseline" not in variants:
        raise PipeError(f"expected names from {', '.join(VARIANT_NAMES)} including baseline; got "
                        f"{','.join(variants)}", option="variants")
    if seeds < 1:
        raise PipeError(f"expected at least 1 seed, got {seeds}", option="seeds")
    if not 0 < threshold < 1:
        raise PipeError(f"expected a training error in (0, 1), got {threshold}", option="threshold")
    ordered = tuple(v for v in VARIANT_NAMES if v in variants)
    units = sweep_units(ordered, tuple(range(seeds)))
    names = [unit_name(v, s) for v, s in units]
    inputs = {"train": Input.of_stage(train_dir, MANIFEST), "val": Input.of_stage(val_dir, MANIFEST)}
    inputs["pca"] = pca_input(pca_path, train_dir, inputs["train"], cfg.pca_from_elsewhere)
    params = {"recipe": recipe, "model": model.to_dict(), "train": {**cfg.trajectory(), "epochs": cfg.epochs,
              "max_steps": cfg.max_steps}, "variants": list(ordered),
              "seeds": seeds, "threshold": threshold, "ten_crop": ten_crop}
    stage = Stage("ablate", VERSION, out, params, inputs, product=ABLATIONS,
                  outputs=(ABLATIONS, "ablations.md", "*.png"))
    if not force:  # before "redoing": a run of the sweep that other settings made is refused, not half-redone
        _refuse_runs_of_other_settings(out, units, model, cfg, inputs, Manifest.read(train_dir).num_classes_total)
    job = _UnitWork(str(train_dir), str(val_dir), str(pca_path), str(out), model.to_dict(), asdict(cfg),
                    dict(units_by_name(units)), ten_crop, devices, force, reporter, train_stage, eval_stage)
    description = partial(_sweep_description, train_dir, val_dir, recipe, model, cfg, seeds, ten_crop)
    hparams_of = partial(switches, model=model, cfg=cfg)
    return stage.execute(lambda: _sweep(stage, names, job, task_index, num_tasks, threshold, description, hparams_of,
                                        reporter),
                         say=reporter, force=force, shown=out / "ablations.md", units=names,
                         exclusive=task_index is None, splittable=True)


def _sweep(stage: Stage, names: list[str], job: _UnitWork, task_index: int | None, num_tasks: int | None,
           threshold: float, description: Callable[[], str], hparams_of: Callable[[str, int], dict],
           reporter: Reporter) -> StageResult:
    """This task's (variant, seed) units; once all are done, the table, its plots and its HParams view."""
    out = stage.out
    mine = [names[i] for i in task_slice(len(names), task_index, num_tasks)]
    todo = [n for n in mine if not stage.unit_done(n)]
    if len(todo) < len(mine):
        reporter.info(f"ablate: {len(mine) - len(todo)} of {len(mine)} runs already trained and evaluated")
    stage.run_units(todo, job, on_done=lambda unit, rec: reporter.info(f"ablate: {unit}: "
                                                                      f"{outcome(SweepRun.from_json(rec))}"),
                    wait_for_others=task_index is None)
    done = sum(stage.unit_done(n) for n in names)
    if done < len(names):
        reporter.info(f"ablate: task done; {done} of {len(names)} runs finished, the table is written when all are")
        return StageResult(stage.name, out)
    records = [SweepRun.from_json(r) for r in stage.records(names).values()]
    summary = replace(summarize(records, threshold), runs=tuple(records), sweep=description())

    def write_products() -> None:
        (out / "figure1.png").unlink(missing_ok=True)  # version 1's name for training-error.png
        write_json(out / ABLATIONS, summary.to_json())
        plot(summary, out)
        with atomic_write(out / "ablations.md", "w") as f:
            f.write(table_markdown(summary, summary.sweep))

    finished = stage.finalize(write_products, runs=len(names))
    sweep_events(out / BOARD, records, hparams_of, reporter.warn)
    reporter.info(f"ablate: {len(names)} runs → {out / 'ablations.md'}")
    return StageResult(stage.name, out, finished=finished, product=summary)


def _refuse_runs_of_other_settings(out: Path, units: list[tuple[str, int]], model: AlexNetConfig, cfg: TrainConfig,
                                   inputs: dict[str, Input], num_classes: int) -> None:
    """Each run folder already in the sweep must belong to the run its unit would train (`RunIdentity`)."""
    for name, seed in units:
        run_dir = out / "runs" / unit_name(name, seed)
        if (run_dir / RUN_SETTINGS).is_file():
            variant_model, variant_cfg = settings_of(name, replace(model, num_classes=num_classes), cfg, seed)
            recorded = RunSettings.read(run_dir / RUN_SETTINGS).settings
            RunIdentity(run_trajectory(variant_model, variant_cfg, inputs)).check(
                upgrade_trajectory(recorded), f"{run_dir} holds a run of this sweep with other settings")


def outcome(record: SweepRun) -> str:
    if record.diverged:
        return f"diverged at step {record.diverged_at_step}"
    return f"val top-1 error {record.top1_error:.4f}, top-5 {record.top5_error:.4f} ({record.test})"


def units_by_name(units: list[tuple[str, int]]) -> list[tuple[str, tuple[str, int]]]:
    return [(unit_name(v, s), (v, s)) for v, s in units]


def _sweep_description(train_dir: Path, val_dir: Path, recipe: str, model: AlexNetConfig, cfg: TrainConfig,
                       seeds: int, ten_crop: bool) -> str:
    train, val = Manifest.read(train_dir), Manifest.read(val_dir)
    return (f"Recipe `{recipe}` (width {model.width:g}, {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g}), "
            f"seeds 0..{seeds - 1}; {train.samples} training images in {len(train.classes)} classes, "
            f"{val.samples} val images, {'10-crop' if ten_crop else 'centre-crop'} test.")


@dataclass(frozen=True)
class _UnitWork:
    """One (variant, seed): the cached train run, then its cached eval; the record is what the table quotes."""

    train_dir: str
    val_dir: str
    pca_path: str
    out: str
    model: dict
    cfg: dict
    units: dict
    ten_crop: bool
    devices: str
    force: bool
    reporter: Reporter
    train_stage: Callable[..., StageResult]
    eval_stage: Callable[..., StageResult]

    def __call__(self, unit: str) -> SweepRun:
        name, seed = self.units[unit]
        model, cfg = settings_of(name, AlexNetConfig.from_dict(self.model), TrainConfig(**self.cfg), seed)
        run_dir, eval_dir = Path(self.out) / "runs" / unit, Path(self.out) / "eval" / unit
        try:
            self.train_stage(Path(self.train_dir), Path(self.val_dir), Path(self.pca_path), run_dir, cfg=cfg,
                             model=model, devices=one_device(self.devices) if model.towers == 1 else self.devices,
                             force=self.force, reporter=self.reporter)
        except Diverged as e:  # a result of the sweep, not a failure of it: recorded, and the sweep goes on
            self.reporter.warn(f"ablate: {unit} diverged at step {e.step}; recorded as diverged")
            return diverged_sweep_record(name, seed, run_dir, e.step)
        self.eval_stage(run_dir, Path(self.val_dir), eval_dir, ten_crop=self.ten_crop,
                        devices=one_device(self.devices), loader=cfg.loader, train_dir=Path(self.train_dir),
                        neighbour_train_images=0, untrained_val_classes=cfg.untrained_val_classes, force=self.force,
                        reporter=self.reporter)
        record = sweep_record(name, seed, run_dir, eval_dir)
        return replace(record, eval_sha256=Input.of_stage(eval_dir, EVAL).digest)


def one_device(devices: str) -> str:
    """The first device of a map (the one-tower net and eval run on one)."""
    if devices == "auto":
        from pipeline.cluster import resolve_devices

        return resolve_devices("auto")[0]
    return devices.split(",")[0].strip()
