"""What a cluster and a careless user do to it: mismatched class sets, the wrong shards given to `eval --train`, a
run whose final checkpoint is gone, a full disk under the report, names too long for a temp file, memory that
cannot be mapped, a dead peer rank, a closed pipe, cut files, and a file named for one format asked to hold
another. Each answer is a right result or one line with a documented exit code."""

from __future__ import annotations

import json

import pytest
from conftest import one_line_error


def test_preview_writes_the_format_its_file_name_says_or_refuses_the_name(tiny_data, cli_here, tmp_path):
    jpeg = tmp_path / "grid.jpg"
    cli_here("preview", tiny_data["train"], "--pca", tiny_data["pca"], "--out", jpeg, "--n", 2)
    assert jpeg.read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG, as its name says (it was PNG bytes)
    png = tmp_path / "grid.png"
    cli_here("preview", tiny_data["train"], "--pca", tiny_data["pca"], "--out", png, "--n", 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gif = tmp_path / "grid.gif"
    line = one_line_error(cli_here("preview", tiny_data["train"], "--pca", tiny_data["pca"], "--out", gif,
                                   check=False))
    assert f"{gif}: expected a file name ending in .png, .jpg, .jpeg" in line and not gif.exists()


@pytest.mark.slow
def test_a_sweep_asked_again_with_another_lr_is_refused_before_anything_is_redone(tiny_data, cli, tmp_path):
    sweep = ["ablate", "--train", tiny_data["train"], "--val", tiny_data["val"], "--pca", tiny_data["pca"], "--out",
             tmp_path / "sweep", "--recipe", "demo", "--seeds", 1, "--variants", "baseline", "--threshold", 0.9,
             "--epochs", 1, "--batch-size", 4, "--width", 0.125, "--init", "default", "--devices", "cpu",
             "--checkpoint-every", 9, "--log-every", 9]
    cli(*sweep, "--lr", 0.003)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    again = cli(*sweep, "--lr", 0.01, check=False)
    line = one_line_error(again)
    assert line.startswith(f"error: {tmp_path / 'sweep' / 'runs' / 'baseline-seed0'} holds a run of this sweep with "
                           "other settings (train.lr 0.003 → 0.01)") and "--force" in line
    assert "redoing" not in again.stdout + again.stderr  # the refusal is the first and only word
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == before


def test_a_cut_manifest_says_how_to_rebuild_it_and_shard_writes_it_again_without_resharding(tiny_data, cli_here,
                                                                                            tmp_path):
    import shutil

    shards = tmp_path / "train"
    shutil.copytree(tiny_data["train"], shards)
    whole = (shards / "manifest.json").read_bytes()
    (shards / "manifest.json").write_bytes(whole[:200])
    line = one_line_error(cli_here("pca-stats", shards, tmp_path / "pca", check=False))
    assert f"{shards / 'manifest.json'}: expected Manifest JSON" in line and "rerun `alexnet-pipe shard`" in line
    tars = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")}
    redone = cli_here("shard", tiny_data["work"] / "demo-data", shards, "--split", "train", "--shard-size", 8)
    assert "manifest.json is missing or damaged; writing it again from the shards' records" in redone.stderr
    assert (shards / "manifest.json").read_bytes() == whole  # the same bytes, from the unit records
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")} == tars  # no image sharded again


@pytest.mark.slow
def test_a_report_of_metrics_cut_short_says_where_they_stop(tiny_run, tiny_data, cli, cli_here, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 6]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in kept) + lines[len(kept)][:20])  # torn
    cli("eval", run, "--val", tiny_data["val"], "--out", tmp_path / "eval", "--devices", "cpu", "--no-ten-crop")
    report = cli_here("report", run, "--eval", tmp_path / "eval", "--out", tmp_path / "report")
    said = "metrics.jsonl ends at step 6, before the evaluated checkpoint's step 18"
    assert f"warning: report: {said}" in report.stderr
    assert f"> **Cut short:** {said}" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
def test_a_report_on_a_full_disk_is_one_line_leaves_no_half_figure_and_a_rerun_completes(tiny_run, tiny_data, cli,
                                                                                         cli_here, small_disk,
                                                                                         tmp_path):
    disk, grow = small_disk
    cli("eval", tiny_run, "--val", tiny_data["val"], "--out", tmp_path / "eval", "--devices", "cpu", "--no-ten-crop")
    (disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))  # 64 KB left: a figure or two fit
    report = disk / "report"
    out = cli_here("report", tiny_run, "--eval", tmp_path / "eval", "--out", report, check=False)
    line = one_line_error(out)
    assert "no space left on the device while writing it" in line and str(report) in line
    written = sorted(p for p in report.iterdir() if not p.name.startswith((".", "_")))  # not the bookkeeping
    assert all(p.suffix == ".png" and p.read_bytes().endswith(b"IEND\xaeB`\x82") for p in written), written
    assert not (report / "report.md").exists()  # no half-written file under a final name, no temp file left
    grow()
    cli_here("report", tiny_run, "--eval", tmp_path / "eval", "--out", report)
    assert (report / "report.md").is_file() and (report / "predictions.png").is_file()


def test_an_output_name_that_fits_the_file_system_is_written_and_one_that_does_not_is_one_line(tiny_data, cli_here,
                                                                                              tmp_path):
    longest = tmp_path / ("p" * 251 + ".png")  # 255 bytes: the limit, where the temp name would not fit
    cli_here("preview", tiny_data["train"], "--pca", tiny_data["pca"], "--out", longest, "--n", 1)
    assert longest.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == [longest.name]
    too_long = tmp_path / ("q" * 252 + ".png")
    line = one_line_error(cli_here("preview", tiny_data["train"], "--pca", tiny_data["pca"], "--out", too_long,
                                   check=False))
    assert "expected a file name of at most 255 bytes (this file system's limit), found 256" in line


def test_train_whose_libraries_cannot_be_mapped_under_an_address_space_limit_says_out_of_memory(tiny_data, tmp_path):
    """`ulimit -v`: torch's shared libraries fail to map when imported, an ImportError, not a MemoryError."""
    import subprocess

    from conftest import CLI, CLI_ENV, train_args

    command = " ".join(f"'{a}'" for a in [CLI, *train_args(tiny_data, tmp_path / "run")])
    out = subprocess.run(["bash", "-c", f"ulimit -v 2000000; exec {command}"], capture_output=True, text=True,
                         env=CLI_ENV, timeout=300)
    line = one_line_error(out)
    assert line.startswith("error: out of memory: lower --batch-size") and "failed to map segment" in line, line


@pytest.mark.slow
def test_train_whose_reader_goes_away_trains_to_the_end_and_exits_0(tiny_data, tmp_path):
    """`train … | head`: the closed pipe drops the lines, not the run (nor the steps since its last checkpoint)."""
    import subprocess

    from conftest import CLI, CLI_ENV, train_args

    run = tmp_path / "run"
    command = " ".join(f"'{a}'" for a in [CLI, *train_args(tiny_data, run)])
    piped = subprocess.run(["bash", "-c", f"{command} 2>&1 | head -2; exit ${{PIPESTATUS[0]}}"], capture_output=True,
                           text=True, env=CLI_ENV, timeout=300)
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 2, piped.stdout + piped.stderr
    assert (run / "_stage.json").is_file()  # finished: every step trained and the run marked done
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 18


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_one_line_from_the_launcher_and_the_survivor_and_the_run_resumes(tiny_data, cli,
                                                                                                  tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from conftest import CLI, train_args
    from test_train import rank_pids, wait_for_step

    run, log = tmp_path / "run", tmp_path / "ranks.log"
    launcher = Path(sys.executable).with_name("alexnet-pipe-torchrun")
    with open(log, "w") as f:
        proc = subprocess.Popen([str(launcher), "--standalone", "--nproc_per_node=2", "--no-python", CLI,
                                 *train_args(tiny_data, run)], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        wait_for_step(run, proc, log, 4)
        os.kill(rank_pids(proc)[1], signal.SIGKILL)
        assert proc.wait(timeout=180) == 6, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Traceback" not in text and "unexpected" not in text, text
    assert "error: train: rank 0 of 2 lost another rank (Connection reset by peer); nothing is lost: rerun" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("torchrun: rank 1 died (killed by SIGKILL); the other ranks stopped. Nothing is lost: "
                           f"rerun the same command to resume from {run / 'checkpoints'}"), text
    resumed = cli(*train_args(tiny_data, run))  # on one rank now, from that checkpoint to the end
    assert "resuming from step" in resumed.stdout + resumed.stderr and (run / "_stage.json").is_file()


@pytest.mark.slow
def test_eval_train_takes_only_the_runs_own_training_shards(tiny_run, tiny_data, cli_here, tmp_path):
    """`eval --train` measures the training error and Figure 4 on the shards given: they must be the run's own."""
    args = ["eval", tiny_run, "--val", tiny_data["val"], "--devices", "cpu", "--no-ten-crop"]
    line = one_line_error(cli_here(*args, "--out", tmp_path / "a", "--train", tiny_data["val"], check=False))
    assert line == f"error: --train: {tiny_data['val']}: expected train shards, found split 'val' in its manifest.json"
    other = tmp_path / "other-train"  # the same images, other shards: another manifest
    cli_here("shard", tiny_data["work"] / "demo-data", other, "--split", "train", "--shard-size", 5)
    line = one_line_error(cli_here(*args, "--out", tmp_path / "b", "--train", other, check=False))
    assert f"--train: {other}: expected the training shards" in line and "found other shards" in line
    assert not (tmp_path / "a" / "eval.json").exists() and not (tmp_path / "b" / "eval.json").exists()


@pytest.mark.slow
def test_status_and_eval_tell_the_truth_of_a_run_whose_final_checkpoint_is_gone_or_damaged(tiny_run, tiny_data,
                                                                                          cli_here, tmp_path):
    import shutil

    from pipeline.status import run_progress, stage_rows
    from stages import versions

    work = tmp_path / "work"
    gone, damaged = work / "runs" / "gone", work / "runs" / "damaged"
    shutil.copytree(tiny_run, gone)
    shutil.copytree(tiny_run, damaged)
    for checkpoint in (gone / "checkpoints").glob("step-*"):  # a final checkpoint that failed on a full disk
        checkpoint.unlink()
    final = damaged / "checkpoints" / "step-000000018.pt"
    data = bytearray(final.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged in place: the same size
    final.write_bytes(bytes(data))
    rows = {r.run: r for r in run_progress(work)}
    assert (rows["runs/gone"].state, rows["runs/gone"].step) == ("damaged", 0)
    assert (rows["runs/damaged"].state, rows["runs/damaged"].step) == ("damaged", 15)  # its newest that verifies
    states = {str(f.relative_to(work)): s.state for _, f, s in stage_rows(work, versions())}
    assert states["runs/gone"] == states["runs/damaged"] == "damaged"

    args = ["--val", tiny_data["val"], "--devices", "cpu", "--no-ten-crop"]
    first = cli_here("eval", damaged, *args, "--out", tmp_path / "eval1")
    assert "step-000000018.pt is damaged" in first.stderr and "set aside as step-000000018.pt.damaged" in first.stderr
    second = cli_here("eval", damaged, *args, "--out", tmp_path / "eval2")  # no longer silent about the step taken
    assert (f"{damaged}: taking step-000000015.pt (step 15), its newest checkpoint that verifies: the newer "
            "step-000000018.pt.damaged was set aside as damaged") in second.stderr
