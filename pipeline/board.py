"""TensorBoard events, written with torch.utils.tensorboard (`make tensorboard` shows them): a training run's curves
as metrics.jsonl logs them, eval's errors, the claims sweep's runs in the HParams view, Figure 1's training-error
curves. Events are a view: metrics.jsonl and the JSON records stay the truth, so a write that fails (a full disk) is
one warning and the events stop while the work goes on. Every figure is written under the tag it has everywhere
else in the project (metrics.jsonl's and eval.json's field names)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

BOARD = "tb"  # the events' folder inside a run, eval, sweep or figure1 folder
EVENTS_GLOB = "events.out.tfevents.*"
Scalar = float | int | None
KERNELS_WIDTH = 600  # conv1's kernels are drawn at least this many pixels wide


class Board:
    """A SummaryWriter that never stops the work it watches: the first failure is one warning (naming the folder and
    the error), after which nothing more is written. `purge_step`: a resumed run's events from that step on are
    stale (TensorBoard drops them when it reads the new file). `replace`: the events are written to a sibling
    folder that takes the folder's place when closed, so a rerun of a stage leaves its events whole or as before."""

    def __init__(self, folder: Path, warn: Callable[[str], None], *, purge_step: int | None = None,
                 replace: bool = False, enabled: bool = True):
        self.folder, self.warn, self.purge_step, self.replace = folder, warn, purge_step, replace
        self.enabled = enabled
        self.writing_to = folder.with_name(f".{folder.name}.new") if replace else folder
        self._writer: SummaryWriter | None = None

    def write(self, what: Callable[[SummaryWriter], Any]) -> None:
        """Call `what` with the writer (opened on first use); an OSError (the disk full, a file in the way) ends the
        events with one warning."""
        if not self.enabled:
            return
        try:
            what(self._open())
        except OSError as e:
            self.enabled = False
            self.warn(f"tensorboard: no more events in {self.folder}: {e.strerror or e}; the work goes on "
                      "(its JSON records hold every figure)")
            self._close_quietly()

    def scalars(self, step: int, values: Mapping[str, Scalar], flush: bool = True) -> None:
        """One value per tag at `step`; a value that is not defined here (None: MFU on a CPU) is left out, not 0."""
        def add(w: SummaryWriter) -> None:
            for tag, value in values.items():
                if value is not None:
                    w.add_scalar(tag, value, step)
            if flush:
                w.flush()
        self.write(add)

    def close(self) -> None:
        """Flush and close; with `replace`, the new events take the folder's place."""
        if self._writer is not None:
            self.write(lambda w: w.close())
        if not self.replace:
            return
        if self.enabled and self.writing_to.is_dir():
            shutil.rmtree(self.folder, ignore_errors=True)
            self.writing_to.rename(self.folder)
        else:
            shutil.rmtree(self.writing_to, ignore_errors=True)

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.enabled = False  # the work failed: keep the events as they were
        self.close()

    def _open(self) -> SummaryWriter:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _writer_thread_errors_raised_by_the_writer()

            if self.replace:
                shutil.rmtree(self.writing_to, ignore_errors=True)
            elif self.purge_step is not None:
                _after_newest_events_file(self.writing_to)
            self._writer = SummaryWriter(str(self.writing_to), purge_step=self.purge_step)
        return self._writer

    def _close_quietly(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass


def _writer_thread_errors_raised_by_the_writer() -> None:
    """TensorBoard's writer writes in a thread that keeps its error for the writer's next call (where `Board.write`
    warns once) and also lets Python print it as a traceback: that print is left out."""
    if getattr(threading.excepthook, "board", False):
        return
    printing = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            printing(args)
    hook.board = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _after_newest_events_file(folder: Path) -> None:
    """Wait, if need be, until a new events file's name (it starts with the second it was opened) sorts after every
    file already in `folder`: TensorBoard reads a folder's files in name order, and the purge of stale steps must
    come after them."""
    stamps = [int(p.name.split(".")[3]) for p in folder.glob(EVENTS_GLOB) if p.name.split(".")[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


def board_folders(work: Path) -> list[Path]:
    """The events folders under `work` (a run's, an eval's, a sweep's and its runs', Figure 1's), relative to it;
    looked for at the depths the stages write them, so that status never walks a tree of images."""
    return sorted(p.relative_to(work) for depth in range(1, 4)
                  for p in work.glob("/".join(["*"] * depth) + f"/{BOARD}") if p.is_dir())


def markdown_rows(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """A markdown table (TensorBoard's text tab renders one)."""
    from pipeline.documents import markdown_table

    return "\n".join(markdown_table(list(header), [[str(c) for c in r] for r in rows]))


# ---------------------------------------------------------------------------------------------------------------
# what each stage writes

def numeric_fields(record: object, skip: tuple[str, ...] = ("step", "epoch", "time")) -> dict[str, Scalar]:
    """A record's numbers by field name (bools and text left out): the scalars its events hold."""
    from dataclasses import fields

    values = {f.name: getattr(record, f.name) for f in fields(record)}  # type: ignore[arg-type]
    return {k: v for k, v in values.items()
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)}


class TrainingBoard:
    """A training run's events in its folder's tb/ (rank 0 writes): each logged step's and each epoch's numbers
    under `step/<field>` and `epoch/<field>` (metrics.jsonl's fields, at the global step), the train–val gap, the
    schedule's decisions as text; at the start the resolved settings and a grid of the first augmented inputs; each
    epoch conv1's kernels per tower (Figure 3 forming) and every parameter's weight and gradient norm. A fresh start
    clears the events as it clears metrics.jsonl; a resume purges those past its checkpoint's step."""

    def __init__(self, board: Board):
        self.board = board

    @classmethod
    def of_run(cls, out: Path, resumed_at: int | None, warn: Callable[[str], None], enabled: bool) -> TrainingBoard:
        """The events of the run in `out`, resumed at step `resumed_at` (None: a fresh start)."""
        if enabled and resumed_at is None:
            shutil.rmtree(out / BOARD, ignore_errors=True)
        return cls(Board(out / BOARD, warn, purge_step=None if resumed_at is None else resumed_at + 1,
                         enabled=enabled))

    @classmethod
    def off(cls) -> TrainingBoard:
        return cls(Board(Path(BOARD), print, enabled=False))

    @property
    def enabled(self) -> bool:
        return self.board.enabled

    def started(self, settings: dict, images, pixel_mean: tuple[float, ...]) -> None:
        """Step 0 of a fresh start: the settings as JSON and the first (up to) 16 training inputs of the first
        batch as the net sees them, the mean added back."""
        import json

        import torch
        from torchvision.utils import make_grid

        shown = images[:16].detach().float().cpu() + 255.0 * torch.tensor(pixel_mean).view(1, 3, 1, 1)
        grid = make_grid(shown.clamp(0, 255) / 255.0, nrow=8, padding=2, pad_value=1.0)

        def add(w: SummaryWriter) -> None:
            w.add_text("settings", "```json\n" + json.dumps(settings, indent=2) + "\n```", 0)
            w.add_image("inputs/augmented", grid, 0)
            w.flush()
        self.board.write(add)

    def step(self, record) -> None:
        self.board.scalars(record.step, {f"step/{k}": v for k, v in numeric_fields(record).items()})

    def epoch(self, record, model) -> None:
        """The epoch's numbers, the gap (val − train top-1 error, the latter as trained), the schedule's words,
        conv1 per tower and the norms."""
        numbers = numeric_fields(record, skip=("step", "epoch", "time", "val_samples"))
        values = {f"epoch/{k}": v for k, v in numbers.items()}
        if record.train_top1_error is not None:
            values["epoch/gap_top1"] = record.val_top1_error - record.train_top1_error
        self.board.scalars(record.step, values, flush=False)
        notes = [n for n in (record.lr_drop, record.lr_held) if n]

        def add(w: SummaryWriter) -> None:
            for note in notes:
                w.add_text("schedule", note, record.step)
            _model_pictures(w, model, record.step)
        self.board.write(add)

    def close(self) -> None:
        self.board.close()


def _model_pictures(w: SummaryWriter, model, step: int) -> None:
    import torch

    from pipeline.figures import figure3
    from pipeline.report import tower_mosaic

    for i, tower in enumerate(figure3(model).towers):
        mosaic = tower_mosaic(tower)
        zoom = max(1, KERNELS_WIDTH // mosaic.shape[1])  # 11-pixel kernels, shown large enough to see
        w.add_image(f"conv1/tower_{'AB'[i]}", mosaic.repeat(zoom, axis=0).repeat(zoom, axis=1), step,
                    dataformats="HWC")
    with torch.no_grad():
        for name, p in model.named_parameters():
            w.add_scalar(f"weight_norm/{name}", p.detach().float().norm().item(), step)
            if p.grad is not None:
                w.add_scalar(f"grad_norm/{name}", p.grad.detach().float().norm().item(), step)
    w.flush()


def eval_events(folder: Path, result, warn: Callable[[str], None]) -> None:
    """eval.json's errors at the checkpoint's step (`eval/<test>_<field>`), the train–val gap when measured (both
    centre crop, eval mode), and the per-class top-1 accuracy as a histogram and a table."""
    step = result.checkpoint.step
    values: dict[str, Scalar] = {}
    for test in ("centre", "ten_crop", "train_centre"):
        if (errors := getattr(result, test)) is not None:
            values |= {f"eval/{test}_{k}": v for k, v in numeric_fields(errors, skip=("samples",)).items()}
    if result.train_centre is not None:
        values["eval/gap_top1"] = result.centre.top1_error - result.train_centre.top1_error
    with Board(folder, warn, replace=True) as board:
        board.scalars(step, values, flush=False)
        if result.per_class:
            rows = sorted(result.per_class, key=lambda c: (c.top1_accuracy, c.index))
            table = markdown_rows(("class", "wnid", "name", "images", "top-1 accuracy"),
                                  ((c.index, c.wnid, c.name, c.samples, f"{c.top1_accuracy:.3f}") for c in rows))

            def add(w: SummaryWriter) -> None:
                w.add_histogram("eval/per_class_top1_accuracy", np.array([c.top1_accuracy for c in rows]), step)
                w.add_text("eval/per_class", table, step)
            board.write(add)


def sweep_events(folder: Path, records, hparams_of: Callable[[str, int], dict], warn: Callable[[str], None]) -> None:
    """The claims sweep in TensorBoard's HParams view: one session per (variant, seed), its settings (`hparams_of`)
    beside its val errors and train–val gap (a diverged run: its settings and the step, no errors)."""
    variants = list(dict.fromkeys(r.variant for r in records))
    with Board(folder, warn, replace=True) as board:
        for r in records:
            metrics = {f"hparams/{k}": v for k, v in numeric_fields(r, skip=("seed", "samples")).items()}
            hparams = {"variant": r.variant, "seed": r.seed, **hparams_of(r.variant, r.seed)}
            board.write(partial(_session, hparams=hparams, metrics=metrics, variants=variants, name=r.name))


def figure1_events(folder: Path, records, warn: Callable[[str], None]) -> None:
    """Each Figure 1 run's training error per fifth of an epoch (x: training images seen) under one tag, so that
    ReLU's and tanh's curves overlay as in the paper's figure: one TensorBoard run per (activation, lr, seed),
    written when the run ends (and again with the figure)."""
    for r in records:
        with Board(folder / f"{r.activation}-lr{r.lr:g}-seed{r.seed}", warn, replace=True) as board:
            board.write(partial(_figure1_curve, parts=r.parts))


def _session(w: SummaryWriter, hparams: dict, metrics: dict, variants: list[str], name: str) -> None:
    # torch's writer would record a bool as the number 1.0 (it tests int before bool): the view shows true/false
    shown = {k: str(v).lower() if isinstance(v, bool) else v for k, v in hparams.items()}
    w.add_hparams(shown, metrics, hparam_domain_discrete={"variant": variants}, run_name=name)


def _figure1_curve(w: SummaryWriter, parts) -> None:
    for part in parts:
        w.add_scalar("figure1/training_error", part.error, part.images)
