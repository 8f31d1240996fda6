"""`alexnet-pipe report` on a real short run and its eval: report.md's numbers are read back and compared with
eval.json and metrics.jsonl; every PNG it links exists and is an image."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PERCENT = r"([0-9.]+)%"


@pytest.fixture(scope="module")
def report(tiny_data, tiny_run, levelled_checkpoint, cli, tmp_path_factory) -> dict:
    """The run's metrics beside the eval of its last checkpoint levelled (conftest): 10-crop and centre differ."""
    out, run = tmp_path_factory.mktemp("report"), levelled_checkpoint.parents[1]
    cli("eval", run, "--val", tiny_data["val"], "--out", out / "eval", "--devices", "cpu")
    said = cli("report", run, "--eval", out / "eval", "--out", out / "eval" / "report")
    return {"dir": out / "eval" / "report", "md": (out / "eval" / "report" / "report.md").read_text(),
            "eval": json.loads((out / "eval" / "eval.json").read_text()), "said": said.stdout + said.stderr,
            "metrics": [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]}


def said(out) -> str:
    return out.stdout + out.stderr


def table(md: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with `header`, as lists of cell texts."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def percent(text: str) -> float:
    return float(re.fullmatch(PERCENT, text).group(1)) / 100


def shows(text: str, value: float) -> bool:
    """Whether `text` ("2.9%") is `value` printed at the text's own precision: exact, unlike a tolerance, at a tie."""
    decimals = len(text.rstrip("%").partition(".")[2])
    return text == f"{value:.{decimals}%}"


@pytest.mark.slow
def test_report_writes_report_md_and_every_png_it_links(report):
    assert str(report["dir"] / "report.md") in report["said"]
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report["md"])
    assert {"loss.png", "lr.png", "val_error.png", "images_per_s.png", "predictions.png"} <= set(linked)
    for name in linked:
        with Image.open(report["dir"] / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200, name
            assert len(np.unique(np.asarray(image.convert("L")))) > 2, f"{name} is blank"


@pytest.mark.slow
def test_error_table_quotes_eval_json(report):
    result, rows = report["eval"], table(report["md"], "| model | top-1 error")
    mine = {row[3].split(",")[0]: row for row in rows if row[0].startswith("this run")}
    assert set(mine) == {"centre 224 crop", "10-crop"} and mine["centre 224 crop"][1:3] != mine["10-crop"][1:3]
    for protocol, key in (("centre 224 crop", "centre"), ("10-crop", "ten_crop")):
        row = mine[protocol]
        assert row[0] == f"this run, {Path(result['checkpoint']['path']).name}"
        assert shows(row[1], result[key]["top1_error"]) and shows(row[2], result[key]["top5_error"])
        assert f"{result['samples']} images" in row[3]
    header = re.search(r"Checkpoint `([^`]+)` \(step (\d+), epoch (\d+), sha256 `([0-9a-f]+)…`\), evaluated on "
                       r"(\d+) validation images \(manifest sha256 `([0-9a-f]+)…`\)", report["md"])
    path, step, epoch, sha, samples, manifest = header.groups()
    assert (path, int(step), int(epoch), int(samples)) == (result["checkpoint"]["path"], result["checkpoint"]["step"],
                                                           result["checkpoint"]["epoch"], result["samples"])
    assert result["checkpoint"]["sha256"].startswith(sha) and result["val"]["manifest_sha256"].startswith(manifest)
    speeds = re.search(r"Evaluation throughput: centre (\d+) images/s, 10-crop (\d+) images/s", report["md"])
    assert [int(s) for s in speeds.groups()] == [round(result["centre"]["images_per_s"]),
                                                 round(result["ten_crop"]["images_per_s"])]


@pytest.mark.slow
def test_training_summary_quotes_metrics_jsonl(report):
    epochs = [r for r in report["metrics"] if "val_top1_error" in r]
    steps = [r for r in report["metrics"] if "loss" in r]
    found = re.search(rf"(\d+) epochs, (\d+) steps; last epoch: val top-1 error {PERCENT}, top-5 {PERCENT}, "
                      r"lr ([0-9.e-]+)\.", report["md"])
    n_epochs, n_steps, top1, top5, lr = found.groups()
    assert (int(n_epochs), int(n_steps)) == (len(epochs), steps[-1]["step"]) == (2, 18)
    assert shows(f"{top1}%", epochs[-1]["val_top1_error"]) and shows(f"{top5}%", epochs[-1]["val_top5_error"])
    assert lr == f"{epochs[-1]['lr']:g}"
    rates = sorted(r["images_per_s"] for r in steps)
    waits = sorted(r["data_wait"] for r in steps)
    step_ms = sorted(r["step_ms"] for r in steps)
    found = re.search(rf"median (\d+) images/s; median share of time waiting on data {PERCENT}; median step "
                      r"([0-9.]+) ms; MFU not known \(fp32: no peak for this device\)\.", report["md"])
    assert found.group(1) == f"{rates[len(rates) // 2]:.0f}"
    assert shows(f"{found.group(2)}%", waits[len(waits) // 2])
    assert found.group(3) == f"{step_ms[len(step_ms) // 2]:.1f}" and step_ms[0] > 0
    assert all(r["mfu"] is None and r["precision"] == "fp32" for r in steps)  # a CPU has no peak in the table


@pytest.mark.slow
def test_per_class_and_confused_tables_quote_eval_json(report):
    result = report["eval"]
    rows = table(report["md"], "| label | wnid")
    assert [(int(r[0]), r[1], int(r[3])) for r in rows] == [(c["index"], c["wnid"], c["samples"])
                                                             for c in result["per_class"]]
    for row, entry in zip(rows, result["per_class"], strict=True):
        assert shows(row[4], entry["top1_accuracy"])
    assert sum(int(r[3]) for r in rows) == result["samples"]
    pairs = table(report["md"], "| true | predicted")
    assert [(r[0].split()[0], r[1].split()[0], int(r[2])) for r in pairs] == [
        (p["true_wnid"], p["predicted_wnid"], p["count"]) for p in result["confused"]]
    assert "Different data" in report["md"]  # 18 images are not ILSVRC-2012's 50,000


@pytest.mark.slow
def test_report_without_an_eval_is_a_one_line_error(tiny_run, cli, tmp_path):
    out = cli("report", tiny_run, "--eval", tmp_path / "nothing", "--out", tmp_path / "report", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "expected a finished stage holding eval.json" in lines[0]


@pytest.mark.slow
def test_report_is_cached_until_the_run_logs_more(report, levelled_checkpoint, cli, tmp_path):
    """Same eval.json and metrics.jsonl → up to date, no file touched; a run that logged more → written again."""
    run, eval_dir = tmp_path / "run", report["dir"].parent
    shutil.copytree(levelled_checkpoint.parents[1], run)
    out = tmp_path / "report"
    cli("report", run, "--eval", eval_dir, "--out", out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert "up to date" in said(cli("report", run, "--eval", eval_dir, "--out", out))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamps

    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**last, "epoch": last["epoch"] + 1, "val_top1_error": 0.123}) + "\n")
    assert "up to date" not in said(cli("report", run, "--eval", eval_dir, "--out", out))
    assert "12.30%" in (out / "report.md").read_text()


def test_the_report_names_its_data_from_the_manifests_not_from_a_sample_count(tiny_data, sample_shards, tmp_path):
    from pipeline.records import ClassCount, Manifest, ShardParams
    from pipeline.report import val_data_origin

    assert val_data_origin(tiny_data["val"]) == ("the generated demo data set (6 of 1,000 classes)", False)
    k = len(json.loads((sample_shards["val"] / "manifest.json").read_text())["classes"])
    assert val_data_origin(sample_shards["val"]) == (f"a subset of ILSVRC-2012 val ({k} of 1,000 classes)", False)
    full = tmp_path / "full-val"  # the manifest of the whole val split (its shards are not needed to name it)
    full.mkdir()
    manifest = Manifest(split="val", params=ShardParams(split="val"), samples=50_000, bytes=0, shards=(),
                        classes=tuple(ClassCount(i, f"n{i:08d}", "", 50) for i in range(1000)))
    (full / "manifest.json").write_text(json.dumps(manifest.to_json()))
    assert val_data_origin(full) == ("the full ILSVRC-2012 val (50,000 images, 1,000 classes)", True)


@pytest.mark.slow
def test_plots_of_a_run_shorter_than_one_epoch_raise_no_library_warning(tiny_run, tmp_path):
    import warnings

    from pipeline.records import read_metrics
    from pipeline.report import plot_curves

    steps = read_metrics(tiny_run).steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_curves(steps[:3], (), tmp_path) == ["loss.png", "lr.png", "val_error.png", "images_per_s.png"]
        plot_curves((), (), tmp_path)
    assert Image.open(tmp_path / "val_error.png").size[0] > 0


@pytest.mark.slow
def test_report_ends_with_what_the_run_and_the_eval_ran_on(report, tiny_run):
    import torch

    record = report["eval"]["run_record"]
    assert record["torch"] == torch.__version__ and " eval " in record["command"]
    section = report["md"][report["md"].index("## What it ran on"):]
    assert "| | training (start at step 0) | evaluation |" in section
    assert f"| torch | `{torch.__version__}` | `{torch.__version__}` |" in section
    started = json.loads((tiny_run / "events.jsonl").read_text().splitlines()[-1])["record"]
    assert f"| command | `{started['command']}` | `{record['command']}` |" in section
