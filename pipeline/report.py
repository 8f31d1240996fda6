"""The report a person reads: report.md with plots of the run and a table beside the paper's numbers."""

from __future__ import annotations

import contextlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import AlexNetConfig
from pipeline.documents import markdown_table, saved_figure
from pipeline.engine import atomic_write, finished_marker, stage_input_path
from pipeline.errors import PipeError
from pipeline.record import read_events
from pipeline.records import (
    EVAL,
    REPORT,
    EpochRecord,
    EvalResult,
    Event,
    Figure3,
    Figure4,
    Manifest,
    Metrics,
    RunRecord,
    StepRecord,
    TowerKernels,
    read_metrics,
    to_plain,
)

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from pipeline.records import Example
    from pipeline.sources import ClassTable

@dataclass(frozen=True)
class Reference:
    """A published result the report sets a run beside, with the protocol it was measured under."""

    name: str
    top1_error: float
    top5_error: float
    protocol: str


PAPER = Reference("Krizhevsky et al. 2012, one CNN", 0.407, 0.182,
                  "ILSVRC-2012 val, the paper's test procedure (10-crop)")
TORCHVISION = Reference("torchvision AlexNet (one-column model)", 0.435, 0.209, "ILSVRC-2012 val, centre 224 crop")


def plot_curves(steps: tuple[StepRecord, ...], epochs: tuple[EpochRecord, ...], out: Path) -> list[str]:
    figures = []
    # (file, title, [(field plotted, its records, field on the x axis)])
    panels: list[tuple[str, str, list[tuple[str, tuple[object, ...], str]]]] = [
        ("loss.png", "training loss", [("loss", steps, "step")]),
        ("lr.png", "learning rate", [("lr", steps, "step")]),
        ("val_error.png", "validation error (centre crop)",
         [("val_top1_error", epochs, "epoch"), ("val_top5_error", epochs, "epoch")]),
        ("images_per_s.png", "training images/s", [("images_per_s", steps, "step")])]
    for name, title, series in panels:
        with saved_figure(out / name, (6, 3.5)) as (_, ax):
            for key, records, x in series:
                if records:
                    ax.plot([getattr(r, x) for r in records], [getattr(r, key) for r in records],
                            marker="." if x == "epoch" else None, label=key.replace("_", " "))
            ax.set_title(title)
            ax.set_xlabel(series[0][2])
            if not ax.get_lines():  # e.g. no epoch finished yet: say so (a legend or log axis of nothing warns)
                ax.text(0.5, 0.5, f"no {series[0][2]} logged yet", ha="center", va="center", transform=ax.transAxes)
            elif name == "lr.png":
                ax.set_yscale("log")
            if len(series) > 1 and ax.get_lines():
                ax.legend()
            ax.grid(alpha=0.3)
        figures.append(name)
    return figures


def shard_samples_by_key(shard_dir: Path, keys: set[str]) -> dict[str, PILImage]:
    """{key: PIL RGB image} for the samples named, read from the shards (stops once all are found)."""
    from PIL import Image

    from pipeline.shards import shard_paths

    images: dict[str, PILImage] = {}
    for tar_path, _ in shard_paths(shard_dir):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key = m.name.rsplit(".", 1)[0]
                if m.name.endswith(".jpg") and key in keys:
                    data = tar.extractfile(m)
                    assert data is not None  # a shard holds regular files only
                    images[key] = Image.open(io.BytesIO(data.read())).convert("RGB")
        if len(images) == len(keys):
            break
    return images


def prediction_grid(eval_result: EvalResult, val_dir: Path, out_png: Path) -> None:
    """Val images with their top-5 predictions; a correct top-1 in green, a correct top-5 in orange."""
    from pipeline.sources import ilsvrc2012_classes

    builtin = ilsvrc2012_classes()
    wanted = {e.key: e for e in eval_result.examples}
    images = shard_samples_by_key(val_dir, set(wanted))
    cols = 4
    rows = max(1, -(-len(wanted) // cols))
    with saved_figure(out_png, (4.2 * cols, 4.4 * rows), dpi=80, nrows=rows, ncols=cols, squeeze=False) as (_, axes):
        for ax in axes.flat:
            ax.axis("off")
        for ax, (key, example) in zip(axes.flat, wanted.items()):
            _prediction_cell(ax, key, example, images[key], builtin)


def _prediction_cell(ax, key: str, example: Example, image: PILImage, builtin: ClassTable) -> None:
    ax.imshow(image)
    # names from the checkpoint's class table (eval.json); an eval.json from before it: the built-in list
    truth = (example.name or builtin.names[example.label]).split(",")[0]
    names = example.top5_names or [builtin.names[c] for c in example.top5]
    lines = []
    for rank, (c, name, p) in enumerate(zip(example.top5, names, example.top5_prob)):
        mark = "✓ " if c == example.label else "  "
        lines.append(f"{mark}{name.split(',')[0][:22]} {p:.2f}")
        if c == example.label:
            colour = "green" if rank == 0 else "darkorange"
    hit = example.label in example.top5
    ax.set_title(f"{key}\ntrue: {truth}", fontsize=8, color=colour if hit else "red")
    ax.text(0, 1.0, "\n".join(lines), transform=ax.transAxes, fontsize=7, va="top", family="monospace",
            bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none"})


def write_report(run_dir: Path, eval_dir: Path, out: Path) -> Path:
    """report.md + PNGs in `out`. Every figure it quotes comes from eval.json and metrics.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    result = EvalResult.read(eval_dir / EVAL)
    metrics = read_metrics(run_dir)
    figures = plot_curves(metrics.steps, metrics.epochs, out)
    val_dir = stage_input_path(eval_dir, "val") or Path(result.val.dir)  # from any working folder
    prediction_grid(result, val_dir, out / "predictions.png")
    md = [*_error_section(result, *val_data_origin(val_dir)),
          *_training_section(metrics, figures, metrics_cut_short(metrics, result.checkpoint.step)),
          *_class_sections(result), *environment_table(read_events(run_dir), result.run_record),
          *figure_sections(result, out, val_dir, stage_input_path(eval_dir, "train"))]
    path = out / REPORT
    with atomic_write(path, "w") as f:
        f.write("\n".join(md))
    return path


def _error_section(result: EvalResult, origin: str, comparable: bool) -> list[str]:
    """What was evaluated on which data, and its errors beside the paper's and torchvision's."""
    checkpoint = result.checkpoint
    rows = [("this run, " + Path(checkpoint.path).name, result.centre, "centre 224 crop")]
    if result.ten_crop is not None:
        rows.append(("this run, " + Path(checkpoint.path).name, result.ten_crop, "10-crop"))
    data = f"{result.samples} images of {result.val.dir}"
    table = markdown_table(["model", "top-1 error", "top-5 error", "protocol"],
                           [[name, f"{errs.top1_error:.2%}", f"{errs.top5_error:.2%}", f"{protocol}, {data}"]
                            for name, errs, protocol in rows]
                           + [[ref.name, f"{ref.top1_error:.1%}", f"{ref.top5_error:.1%}", ref.protocol]
                              for ref in (PAPER, TORCHVISION)])
    chance = 1 / len(result.per_class) if result.per_class else 0
    md = [
        "# AlexNet run report", "",
        f"Checkpoint `{checkpoint.path}` (step {checkpoint.step}, epoch {checkpoint.epoch}, sha256 "
        f"`{checkpoint.sha256[:16]}…`), evaluated on {result.samples} validation images (manifest sha256 "
        f"`{result.val.manifest_sha256[:16]}…`) of {origin}.", "",
        f"Model: {model_switches(result.model)}.", "",
    ]
    if not comparable:
        md += [f"> **Different data.** This run used {origin}, not the full ILSVRC-2012: its errors are not "
               f"comparable with the paper's. Chance top-1 error here is {1 - chance:.1%} "
               f"({len(result.per_class)} classes present, top-1 over all 1,000 outputs).", ""]
    return md + ["## Error", "", *table, "",
                 f"Evaluation throughput: centre {result.centre.images_per_s:.0f} images/s"
                 + (f", 10-crop {result.ten_crop.images_per_s:.0f} images/s" if result.ten_crop else "") + ".", ""]


def metrics_cut_short(metrics: Metrics, checkpoint_step: int) -> str | None:
    """Why the curves stop before the evaluated checkpoint (lines lost to a crash or a full disk), or None."""
    logged = max([s.step for s in metrics.steps] + [e.step for e in metrics.epochs], default=0)
    if logged >= checkpoint_step:
        return None
    return (f"metrics.jsonl ends at step {logged}, before the evaluated checkpoint's step {checkpoint_step}: its "
            "later lines were lost (cut short), so the curves and counts below stop there")


def _training_section(metrics: Metrics, figures: list[str], cut_short: str | None) -> list[str]:
    md = ["## Training", ""] + ([f"> **Cut short:** {cut_short}.", ""] if cut_short else [])
    if metrics.epochs:
        last = metrics.epochs[-1]
        md += [f"{len(metrics.epochs)} epochs, {last.step} steps; last epoch: val top-1 error "
               f"{last.val_top1_error:.2%}, top-5 {last.val_top5_error:.2%}, lr {last.lr:g}.", ""]
    if metrics.steps:
        md += [_speed_line(metrics.steps), ""]
    return md + [f"![{f}]({f})" for f in figures] + [""]


def _class_sections(result: EvalResult) -> list[str]:
    """Per-class accuracy, the most confused pairs and the predictions grid."""
    return ["## Per class (centre crop)", "",
            *markdown_table(["label", "wnid", "name", "images", "top-1 accuracy"],
                            [[str(c.index), c.wnid, c.name, str(c.samples), f"{c.top1_accuracy:.1%}"]
                             for c in result.per_class]),
            "", "## Most confused pairs", "",
            *markdown_table(["true", "predicted", "count"],
                            [[f"{p.true_wnid} {p.true_name}", f"{p.predicted_wnid} {p.predicted_name}", str(p.count)]
                             for p in result.confused]),
            "", "## Predictions", "", "Top-5 predictions for the first validation images (✓ marks the true class; "
            "Figure 4, left).", "", "![predictions](predictions.png)", ""]


def environment_table(events: list[Event], eval_record: RunRecord | None) -> list[str]:
    """The run records (pipeline.record) of the training run's last start and of the eval, side by side."""
    columns = [(f"training ({e.event} at step {e.step})", to_plain(e.record)) for e in events[-1:]]
    columns += [("evaluation", to_plain(eval_record))] if eval_record else []
    if not columns:
        return []

    def cell(value) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k} {v}" for k, v in value.items())
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "none"
        return f"`{value}`".replace("|", "\\|") if value is not None else "—"

    keys = list(dict.fromkeys(k for _, record in columns for k in record))
    return ["## What it ran on", "", "| | " + " | ".join(name for name, _ in columns) + " |",
            "|---|" + "---|" * len(columns),
            *(f"| {k} | " + " | ".join(cell(record.get(k)) for _, record in columns) + " |" for k in keys), ""]


def val_data_origin(val_dir: Path) -> tuple[str, bool]:
    """(where the val shards came from, whether the paper's errors compare), read from the shard set's manifest
    and done marker: the generated demo set (its source is a `synth` stage folder), a subset of ILSVRC-2012, or
    the full ILSVRC-2012 val. Never guessed from a sample count alone."""
    manifest = Manifest.read(val_dir)
    k, total = len(manifest.classes), manifest.num_classes_total
    source = stage_input_path(val_dir, "source") or Path("/nonexistent")
    for folder in (source, source.parent):
        with contextlib.suppress(PipeError):  # a cut marker: not known to be the demo set
            if (marker := finished_marker(folder)) is not None and marker.stage == "synth":
                return f"the generated demo data set ({k} of {total:,} classes)", False
    if k == total == 1000 and manifest.samples == 50_000 and manifest.split == "val":
        return "the full ILSVRC-2012 val (50,000 images, 1,000 classes)", True
    return f"a subset of ILSVRC-2012 {manifest.split} ({k} of {total:,} classes)", False


def _speed_line(steps: tuple[StepRecord, ...]) -> str:
    """Medians of the logged steps' speed fields (pipeline/train/speed.py; runs from before it lack step_ms and mfu)."""
    def median(key: str) -> float | None:
        values = sorted(v for s in steps if (v := getattr(s, key)) is not None)
        return values[len(values) // 2] if values else None

    line = (f"Training throughput: median {median('images_per_s'):.0f} images/s; median share of time waiting on "
            f"data {median('data_wait'):.1%}")
    if median("step_ms") is not None:
        line += f"; median step {median('step_ms'):.1f} ms"
    utilization, precision = median("mfu"), steps[-1].precision
    if precision is not None:
        line += f"; MFU {utilization:.1%} ({precision})" if utilization is not None else \
            f"; MFU not known ({precision}: no peak for this device)"
    return line + "."


def tower_mosaic(tower: TowerKernels, columns: int = 16) -> np.ndarray:
    """One tower's conv1 kernels in rows of `columns`, each scaled to [0, 1] on its own, grey between them."""
    kernels = np.asarray(tower.kernels, dtype=np.float64).transpose(0, 2, 3, 1)  # K, h, w, RGB
    low = kernels.min(axis=(1, 2, 3), keepdims=True)
    span = kernels.max(axis=(1, 2, 3), keepdims=True) - low
    kernels = (kernels - low) / np.where(span > 0, span, 1.0)
    k, h, w, _ = kernels.shape
    cols = min(columns, k)
    rows = -(-k // cols)
    block = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 0.5)
    for i, kernel in enumerate(kernels):
        r, c = divmod(i, cols)
        block[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = kernel
    return block


def tower_caption(index: int, tower: TowerKernels) -> str:
    """`tower A: 48 kernels, chroma 0.213, neighbour correlation 0.61 (0.01 at step 0)`."""
    line = f"tower {'AB'[index]}: {len(tower.kernels)} kernels, chroma {tower.mean_chroma:.3f}"
    if tower.neighbour_correlation is not None:
        line += f", neighbour correlation {tower.neighbour_correlation:.2f}"
        if tower.neighbour_correlation_at_init is not None:
            line += f" ({tower.neighbour_correlation_at_init:.2f} at step 0)"
    return line


def kernel_figure(figure3: Figure3, step: int, out_png: Path) -> None:
    """figure3.png: each tower's kernels under its own caption (which tower, its numbers), the step in the title."""
    blocks = [tower_mosaic(t) for t in figure3.towers]
    heights = [b.shape[0] for b in blocks]
    with saved_figure(out_png, (8, 0.5 + 0.09 * sum(heights) + 0.4 * len(blocks)), nrows=len(blocks), ncols=1,
                      gridspec_kw={"height_ratios": heights}, squeeze=False) as (fig, axes):
        for i, (ax, block, tower) in enumerate(zip(axes[:, 0], blocks, figure3.towers)):
            ax.imshow(block, interpolation="nearest")
            ax.set_title(tower_caption(i, tower), fontsize=9)
            ax.axis("off")
        fig.suptitle(f"conv1 kernels at step {step:,}, each scaled for display", fontsize=10)


def _structure_lines(figure: Figure3) -> list[str]:
    """What the kernels learnt, in one number per tower against the same number at step 0."""
    towers = [t for t in figure.towers if t.neighbour_correlation is not None]
    if not towers:
        return []
    said = "; ".join(f"tower {'AB'[i]} {t.neighbour_correlation:.2f}" + (
        f" (step 0: {t.neighbour_correlation_at_init:.2f})" if t.neighbour_correlation_at_init is not None else "")
        for i, t in enumerate(towers))
    return [f"Learnt structure vs the initial noise, as the mean correlation of each kernel weight with its right and "
            f"lower neighbours (about 0 for independent random weights; smooth edges and colour blobs are well "
            f"above it): {said}.", ""]


def neighbour_grid(figure4: Figure4, val_dir: Path, train_dir: Path, out_png: Path) -> None:
    """Figure 4 (right): each val image, then its six nearest training images by fc7 distance."""
    queries = figure4.queries
    val = shard_samples_by_key(val_dir, {q.key for q in queries})
    train = shard_samples_by_key(train_dir, {n.key for q in queries for n in q.neighbours})
    cols = 1 + max(len(q.neighbours) for q in queries)
    with saved_figure(out_png, (1.8 * cols, 1.9 * len(queries)), dpi=80, nrows=len(queries), ncols=cols,
                      squeeze=False) as (_, axes):
        for ax in axes.flat:
            ax.axis("off")
        for row, query in zip(axes, queries):
            row[0].imshow(val[query.key])
            row[0].set_title(f"val {query.label}", fontsize=7, color="blue")
            for ax, n in zip(row[1:], query.neighbours):
                ax.imshow(train[n.key])
                ax.set_title(f"{n.label} d={n.distance:.3g}", fontsize=7,
                             color="green" if n.label == query.label else "black")


def figure_sections(result: EvalResult, out: Path, val_dir: Path, train_dir: Path | None) -> list[str]:
    """Figure 3 and Figure 4 (right) from eval.json, when eval computed them: the PNGs and their report lines."""
    md = []
    if result.figure3 is not None:
        figure = result.figure3
        kernel_figure(figure, result.checkpoint.step, out / "figure3.png")
        numbers = ", ".join(f"tower {'AB'[i]} {t.mean_chroma:.3f}" for i, t in enumerate(figure.towers))
        verdict = ("" if figure.differ is None else " The two towers' numbers differ (by more than two standard "
                   "errors over their kernels)." if figure.differ else " The two towers' numbers do not differ "
                   "beyond two standard errors over their kernels.")
        md += ["## Figure 3: conv1's kernels", "",
               f"Tower A's kernels above tower B's, each scaled for display. Colour-specific vs colour-agnostic, "
               f"measured as the {figure.measure} (0: grey, colour-agnostic): {numbers}.{verdict} The paper "
               "(§6.1) saw one tower largely colour-agnostic and the other colour-specific in every run; which is "
               "which is arbitrary.", "", *_structure_lines(figure), "![figure 3](figure3.png)", ""]
    if result.figure4 is not None:
        neighbours = result.figure4
        neighbour_grid(neighbours, val_dir, train_dir or Path(neighbours.train_dir), out / "figure4.png")
        md += ["## Figure 4 (right): nearest training images", "",
               f"For the first {len(neighbours.queries)} val images (first column), the six training images whose "
               f"{neighbours.layer} vectors are nearest in Euclidean distance, searched over "
               f"{neighbours.train_images} training images of {neighbours.train_dir} (label and distance above each; "
               "green: the query's class).", "", "![figure 4](figure4.png)", ""]
    return md


def model_switches(config: AlexNetConfig) -> str:
    """The ablation switches of a checkpoint's model config."""
    return (f"activation {config.activation}, norm {config.norm}, pool {config.pool}, towers {config.towers}, "
            f"width {config.width:g}, dropout {config.dropout:g}")
