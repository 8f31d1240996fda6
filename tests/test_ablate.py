"""Stage `ablate`: a tiny sweep (baseline and tanh, two seeds, one epoch each) through the real CLI; its table
quotes the runs' eval.json, a rerun does nothing, and a sweep stopped mid-run resumes (as two array tasks) to the
same table."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import time

import pytest
from conftest import hparams_sessions

from pipeline.experiments.claims import summarize
from pipeline.records import SweepRun

SWEEP = ["--variants", "baseline,tanh", "--seeds", "2", "--threshold", "0.9", "--width", "0.125", "--init",
         "default", "--lr", "0.003", "--epochs", "1", "--batch-size", "4", "--devices", "cpu", "--checkpoint-every",
         "3", "--log-every", "1"]
UNITS = ["baseline-seed0", "tanh-seed0", "baseline-seed1", "tanh-seed1"]


def sweep_args(tiny_data, out, *extra) -> list:
    return ["ablate", "--train", tiny_data["train"], "--val", tiny_data["val"], "--pca", tiny_data["pca"], "--out",
            out, *SWEEP, *extra]


@pytest.fixture(scope="module")
def sweep(tiny_data, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("sweep") / "ablations"
    cli(*sweep_args(tiny_data, out), timeout=1200)
    return out


def without_digests(table: dict) -> dict:
    """The table minus what names its folder (eval.json holds the checkpoint path, so its digest does too)."""
    return {**table, "runs": [{k: v for k, v in r.items() if k != "eval_sha256"} for r in table["runs"]]}


@pytest.mark.slow
def test_every_number_in_the_table_equals_its_runs_eval_json(sweep):
    table = json.loads((sweep / "ablations.json").read_text())
    evals = {u: json.loads((sweep / "eval" / u / "eval.json").read_text()) for u in UNITS}
    assert sorted(f"{r['variant']}-seed{r['seed']}" for r in table["runs"]) == sorted(UNITS)
    for record in table["runs"]:
        result = evals[f"{record['variant']}-seed{record['seed']}"]
        assert record["test"] == "ten_crop"
        assert (record["top1_error"], record["top5_error"]) == (result["ten_crop"]["top1_error"],
                                                                result["ten_crop"]["top5_error"])
        # the gap is measured alike on both sides: eval mode, centre crop, as many training images as val holds
        assert result["train_centre"]["samples"] == result["samples"]
        assert record["gap_top1"] == result["centre"]["top1_error"] - result["train_centre"]["top1_error"]
    rows = {r["variant"]: r for r in table["rows"]}
    md = (sweep / "ablations.md").read_text()
    for variant in ("baseline", "tanh"):
        for metric in ("top1_error", "top5_error"):
            values = [evals[f"{variant}-seed{s}"]["ten_crop"][metric] for s in (0, 1)]
            assert rows[variant][metric]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert rows[variant][metric]["sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
            assert f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}" in md
        curves = [[json.loads(line).get("train_top1_error") for line in
                   (sweep / "runs" / f"{variant}-seed{s}" / "metrics.jsonl").read_text().splitlines()
                   if "val_top1_error" in line] for s in (0, 1)]
        assert rows[variant]["train_top1_error_mean"] == pytest.approx([statistics.fmean(c) for c in zip(*curves)])
    diff = rows["tanh"]["top1_error_diff"]
    assert diff["mean"] == pytest.approx(rows["tanh"]["top1_error"]["mean"] - rows["baseline"]["top1_error"]["mean"])
    assert diff["se"] == pytest.approx(math.hypot(rows["tanh"]["top1_error"]["sd"],
                                                  rows["baseline"]["top1_error"]["sd"]) / math.sqrt(2))
    assert "smallest top-1 difference this sweep can detect" in md
    assert {"training-error.png", "ablations.png"} <= {p.name for p in sweep.iterdir()}
    # the switch is in the run's checkpoint config, so eval (and the report) know it
    assert evals["tanh-seed0"]["model"]["activation"] == "tanh" and evals["baseline-seed0"]["model"]["activation"] \
        == "relu"


@pytest.mark.slow
def test_the_hparams_view_lists_every_variant_and_seed_with_its_settings_and_errors(sweep):
    table = json.loads((sweep / "ablations.json").read_text())
    sessions = hparams_sessions(sweep / "tb")
    assert sorted(sessions) == sorted(UNITS)
    for record in table["runs"]:
        hparams, metrics = sessions[f"{record['variant']}-seed{record['seed']}"]
        assert (hparams["variant"], hparams["seed"]) == (record["variant"], record["seed"])
        assert hparams["activation"] == ("tanh" if record["variant"] == "tanh" else "relu")
        assert hparams["dropout"] == 0.5 and hparams["towers"] == 2 and hparams["mirror"] == "true"
        assert metrics["hparams/top1_error"] == pytest.approx(record["top1_error"])
        assert metrics["hparams/gap_top1"] == pytest.approx(record["gap_top1"])
    # every run of the sweep has its own training curves beside its eval's errors
    assert all((sweep / kind / unit / "tb").is_dir() for kind in ("runs", "eval") for unit in UNITS)


@pytest.mark.slow
def test_a_rerun_of_a_finished_sweep_is_up_to_date_and_writes_nothing(sweep, tiny_data, cli):
    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file()}
    out = cli(*sweep_args(tiny_data, sweep))
    assert "up to date" in out.stderr
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_mid_run_records_nothing_of_it_and_resumes_as_two_array_tasks(
        sweep, tiny_data, cli, cli_popen, tmp_path):
    """SIGTERM, as Slurm sends on preemption: the run being trained stops at a checkpoint and is neither evaluated
    nor recorded as done (a partly trained run in the table would be a wrong result)."""
    out, log = tmp_path / "ablations", tmp_path / "log"
    proc = cli_popen(*sweep_args(tiny_data, out), log=log)
    deadline = time.monotonic() + 600
    while not list((out / "runs" / "baseline-seed1" / "checkpoints").glob("step-*.pt")):  # inside the third run
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()
    assert "train: stopped at step" in log.read_text() and "(SIGTERM), rerun to resume" in log.read_text()
    assert sorted(p.stem for p in (out / "_units").glob("*.json")) == ["baseline-seed0", "tanh-seed0"]
    assert not (out / "eval" / "baseline-seed1").exists() and not (out / "ablations.json").exists()
    # task 0 owns the seed-0 runs, both finished: it leaves the table to the task that finishes last
    first = cli(*sweep_args(tiny_data, out, "--task-index", "0", "--num-tasks", "2"), timeout=1200)
    assert "2 of 2 runs already trained" in first.stderr and "2 of 4 runs finished" in first.stderr
    assert not (out / "ablations.json").exists()
    # task 1 resumes baseline-seed1 where it stopped, trains tanh-seed1 and, finishing last, writes the table
    last = cli(*sweep_args(tiny_data, out, "--task-index", "1", "--num-tasks", "2"), timeout=1200)
    assert "train: resuming from step" in last.stderr, last.stderr
    assert without_digests(json.loads((out / "ablations.json").read_text())) == without_digests(
        json.loads((sweep / "ablations.json").read_text()))


def test_summary_says_within_the_noise_and_the_smallest_detectable_difference():
    def record(variant, seed, top1):
        return SweepRun(variant, seed, "ten_crop", top1, top1 / 2, 100,
                        (0.9, 0.6, 0.4) if variant == "baseline" else (0.9, 0.8, 0.7))

    base, noisy, far = [0.50, 0.60, 0.55], [0.52, 0.62, 0.57], [0.90, 0.91, 0.92]
    records = ([record("baseline", s, e) for s, e in enumerate(base)] + [record("tanh", s, e) for s, e in
                                                                        enumerate(noisy)]
               + [record("no-lrn", s, e) for s, e in enumerate(far)])
    summary = summarize(records, threshold=0.5)
    rows = {r.variant: r for r in summary.rows}
    assert rows["tanh"].top1_error_diff.within_noise is True
    assert rows["no-lrn"].top1_error_diff.within_noise is False
    pooled = math.sqrt((2 * statistics.variance(base) + 2 * statistics.variance(noisy) + 2 * statistics.variance(far))
                       / 6)
    assert summary.smallest_detectable_top1 == pytest.approx(2 * pooled * math.sqrt(2 / 3))
    assert rows["baseline"].epochs_to_threshold == (3, 3, 3) and rows["tanh"].epochs_to_threshold_mean is None
