"""Nothing silently wrong, through the real CLI: a diverged, mixed or stale result is refused or repaired in one line
(never reported as a good one), every file name reaches both loaders, and the cases a user can cause (a cut archive,
an unreadable folder, too little memory, a read-only disk) are one line naming what to do."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import one_line_error
from PIL import Image

from pipeline.records import METRICS, parse_metrics
from pipeline.sources import sample_key

CLI = str(Path(sys.executable).with_name("alexnet-pipe"))


def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.pt"))


# ---------------------------------------------------------------------------------------------------------------
# results that would be wrong with exit 0

@pytest.mark.slow
def test_a_diverging_run_exits_5_keeps_its_finite_checkpoints_and_eval_refuses_it_and_any_nan_weights(
        tiny_data, tiny_run, train_cmd, cli, tmp_path):
    run = tmp_path / "diverged"
    out = cli(*train_cmd(tiny_data, run, lr="1e6", checkpoint_every=1), check=False)
    line = one_line_error(out, "train: diverged: ", code=5)
    step = json.loads((run / "_diverged.json").read_text())["step"]
    assert re.search(rf"(loss (nan|inf|-inf)|weights that are not finite after the update) at step {step} ", line)
    kept = checkpoint_steps(run)
    assert kept and all(s < step for s in kept)
    for path in (run / "checkpoints").glob("step-*.pt"):
        weights = torch.load(path, map_location="cpu", weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values())
    assert "diverged" in cli("status", run.parent).stdout
    one_line_error(cli(*train_cmd(tiny_data, run, lr="1e6", checkpoint_every=1), check=False), "--force", code=5)
    one_line_error(cli("eval", run, "--val", tiny_data["val"], "--out", tmp_path / "eval", check=False),
                   "diverged", f"step-{kept[-1]:09d}.pt")

    state = torch.load(sorted((tiny_run / "checkpoints").glob("step-*.pt"))[-1], map_location="cpu",
                       weights_only=True)
    state["model"]["fc8.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    one_line_error(cli("eval", tmp_path / "nan.pt", "--val", tiny_data["val"], "--out", tmp_path / "eval", check=False),
                   "nan.pt", "fc8.bias")
    one_line_error(cli("predict", tmp_path / "nan.pt", tiny_data["work"] / "demo-data" / "val", check=False),
                   "fc8.bias")
    one_line_error(cli(*train_cmd(tiny_data, tmp_path / "inf", lr="inf"), check=False), "lr must be a finite number")


@pytest.mark.slow
def test_an_ablation_whose_runs_diverge_records_them_and_still_writes_its_table(tiny_data, cli, tmp_path):
    out = tmp_path / "ablations"
    done = cli("ablate", "--train", tiny_data["train"], "--val", tiny_data["val"], "--pca", tiny_data["pca"],
               "--out", out, "--variants", "baseline", "--seeds", "1", "--width", "0.125", "--init", "default",
               "--lr", "1e6", "--epochs", "1", "--batch-size", "4", "--devices", "cpu", "--log-every", "1",
               "--no-ten-crop")
    assert "diverged" in done.stdout + done.stderr
    [row] = json.loads((out / "ablations.json").read_text())["rows"]
    assert row["diverged"] and row["top1_error"]["mean"] is None
    assert "diverged" in (out / "ablations.md").read_text()


@pytest.mark.slow
def test_a_finished_run_missing_its_final_checkpoint_is_not_done_and_train_runs_it_to_the_end(
        tiny_data, tiny_run, train_cmd, cli, tmp_path):
    run = run_copy(tiny_run, tmp_path)
    final = run / "checkpoints" / "step-000000018.pt"
    final.write_bytes(final.read_bytes()[:1000])
    row = next(line for line in cli("status", tmp_path).stdout.splitlines() if "run" in line and "│" in line)
    assert "done" not in row, row
    resumed = cli(*train_cmd(tiny_data, run))
    said = (resumed.stdout + resumed.stderr).splitlines()
    assert "finished, but" in said[0] and "resuming from step 15" in said[2], said  # warned, set aside, resumed
    assert checkpoint_steps(run)[-1] == 18 and "up to date" in cli(*train_cmd(tiny_data, run)).stderr


@pytest.mark.slow
def test_a_checkpoint_of_other_settings_in_the_run_folder_is_named_not_resumed(tiny_data, tiny_run, train_cmd, cli,
                                                                              tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for path in (tiny_run / "checkpoints").glob("step-000000018.pt*"):
        shutil.copy(path, run / "checkpoints")
    one_line_error(cli(*train_cmd(tiny_data, run, lr="0.01"), check=False), "lr", "0.003", "0.01")


@pytest.mark.slow
def test_a_rerun_says_where_it_resumes_on_its_first_line(tiny_data, tiny_run, train_cmd, cli, tmp_path):
    run = run_copy(tiny_run, tmp_path)
    resumed = cli(*train_cmd(tiny_data, run, epochs=3, max_steps=19))
    assert (resumed.stdout + resumed.stderr).splitlines()[0].startswith("train: resuming from step 18, epoch 2")


@pytest.mark.slow
def test_report_refuses_an_eval_of_another_runs_checkpoint_and_reads_past_a_torn_metrics_line(
        tiny_data, tiny_run, levelled_checkpoint, cli, tmp_path):
    run = run_copy(levelled_checkpoint.parents[1], tmp_path)
    whole = (run / METRICS).read_text()
    (run / METRICS).write_text(whole + whole.splitlines()[-1][:25])  # the disk filled mid-line
    assert parse_metrics((run / METRICS).read_text().splitlines()) == parse_metrics(whole.splitlines())
    assert "done" in cli("status", tmp_path).stdout
    evaluated = run / "checkpoints" / levelled_checkpoint.name
    cli("eval", evaluated, "--val", tiny_data["val"], "--out", tmp_path / "eval", "--no-ten-crop")
    cli("report", run, "--eval", tmp_path / "eval", "--out", tmp_path / "report")
    assert (tmp_path / "report" / "report.md").is_file()
    one_line_error(cli("report", tiny_run, "--eval", tmp_path / "eval", "--out", tmp_path / "other", check=False),
                   str(evaluated), "not one of the", str(tiny_run))


@pytest.mark.slow
def test_a_pca_of_other_shards_is_refused_unless_said_to_come_from_elsewhere(tiny_data, train_cmd, cli, tmp_path):
    cli("pca-stats", tiny_data["val"], tmp_path / "pca-of-val")
    pca = tmp_path / "pca-of-val" / "pca.json"
    data = {**tiny_data, "pca": pca}
    one_line_error(cli(*train_cmd(data, tmp_path / "run"), check=False),
                   str(pca), str(tiny_data["train"]), "--pca-from-elsewhere")
    assert not (tmp_path / "run").exists()
    cli(*train_cmd(data, tmp_path / "run", max_steps=1, pca_from_elsewhere=True))


# ---------------------------------------------------------------------------------------------------------------
# stale, moved and damaged stage folders

@pytest.mark.slow
def test_a_changed_parameter_is_the_first_line_of_the_rerun(tiny_data, cli, tmp_path):
    source = tiny_data["work"] / "demo-data"
    cli("shard", source, tmp_path / "val", "--split", "val", "--shard-size", 8)
    redone = cli("shard", source, tmp_path / "val", "--split", "val", "--shard-size", 9)
    assert redone.stderr.splitlines()[0] == f"shard val: redoing {tmp_path / 'val'}: params changed: shard_size 8 → 9"


@pytest.mark.slow
def test_status_is_the_same_from_any_folder_after_the_work_folder_moved_and_shows_a_cut_marker_as_damaged(
        tiny_data, tmp_path):
    work = tmp_path / "moved"
    for name in ("demo-data", "shards", "pca"):
        shutil.copytree(tiny_data["work"] / name, work / name)

    def rows(cwd: Path) -> dict[str, str]:
        out = subprocess.run([CLI, "status", str(work)], cwd=cwd, capture_output=True, text=True, check=True,
                             env={**os.environ, "COLUMNS": "250"})
        return {cells[1].strip(): cells[3].strip() for line in out.stdout.splitlines()
                if len(cells := line.split("│")) > 4 and cells[1].strip()}

    here, there = rows(work), rows(Path("/"))
    assert here == there and [here[k] for k in ("shard train", "shard val", "pca-stats")] == ["done"] * 3, here
    marker = work / "pca" / "_stage.json"
    marker.write_text(marker.read_text()[:40])
    assert rows(work)["pca-stats"] == "damaged" and rows(work)["shard train"] == "done"


@pytest.mark.slow
def test_an_output_folder_inside_the_source_split_is_refused(tiny_data, cli):
    source = tiny_data["work"] / "demo-data"
    one_line_error(cli("shard", source, source / "val" / "shards", "--split", "val", check=False),
                   str(source / "val" / "shards"), "inside")
    assert not (source / "val" / "shards").exists()


@pytest.mark.slow
def test_a_synth_already_running_is_told_to_wait_without_a_task_option_it_lacks(tiny_data, cli, tmp_path):
    out = tmp_path / "demo-data"
    cli("synth", out, "--classes", 2, "--train-per-class", 1, "--val-per-class", 1)
    with open(out / ".locks" / "run", "a") as held:  # as a full run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = cli("synth", out, "--classes", 2, "--train-per-class", 1, "--val-per-class", 1, "--force",
                   check=False, timeout=60)
    assert busy.returncode != 0 and "already running" in busy.stderr and "--task-index" not in busy.stderr


# ---------------------------------------------------------------------------------------------------------------
# every file name

def test_sample_keys_keep_every_imagenet_name_and_escape_the_rest_to_distinct_keys():
    assert sample_key("n01440764_10026.JPEG", "n01440764") == "n01440764_10026"
    assert sample_key("ILSVRC2012_val_00000001.JPEG", None) == "ILSVRC2012_val_00000001"
    assert sample_key("ILSVRC2012_val_00000001.JPEG", "n01440764") == "ILSVRC2012_val_00000001"
    assert sample_key("val_17.JPEG", None) == "val_17"  # Tiny ImageNet's val
    names = ["my.photo.JPEG", "my photo.JPEG", "my%2Ephoto.JPEG", "1.JPEG", "1.jpeg", "é.JPEG"]
    keys = [sample_key(n, c) for c in ("n01440764", "n01443537") for n in names]
    assert len(set(keys)) == len(keys) and all(set(k) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                              "0123456789_-%~") for k in keys), keys


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_dots_spaces_and_names_repeated_in_every_class_shard_verify_and_train(loader, tiny_data, train_cmd, cli,
                                                                             tmp_path_factory):
    tree = tmp_path_factory.getbasetemp() / "odd-names"
    if not tree.exists():
        shutil.copytree(tiny_data["work"] / "demo-data", tree)
        for folder in (tree / "train").iterdir():
            images = sorted(folder.iterdir())
            for image, name in zip(images, ["my.photo.JPEG", "my photo.JPEG", "1.JPEG"]):
                image.rename(folder / name)
        for split in ("train", "val"):
            cli("shard", tree, tree.parent / "odd-shards" / split, "--split", split, "--shard-size", 8)
            cli("verify", tree.parent / "odd-shards" / split, "--decode")
    shards = tree.parent / "odd-shards"
    data = {"train": shards / "train", "val": shards / "val", "pca": tiny_data["pca"]}
    cli(*train_cmd(data, tree.parent / f"run-{loader}", max_steps=2, loader=loader, pca_from_elsewhere=True))
    assert parse_metrics((tree.parent / f"run-{loader}" / METRICS).read_text().splitlines()).steps[-1].step == 2


@pytest.mark.slow
def test_two_images_that_differ_only_in_their_suffix_are_refused_naming_both(tiny_data, cli, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(tiny_data["work"] / "demo-data", tree)
    first = sorted(next((tree / "train").iterdir()).iterdir())[0]
    Image.open(first).save(first.with_suffix(".png"))
    one_line_error(cli("shard", tree, tmp_path / "out", "--split", "train", check=False),
                   first.name, first.with_suffix(".png").name, "differ only in their suffix")


# ---------------------------------------------------------------------------------------------------------------
# one line where a traceback was

@pytest.mark.slow
def test_a_cut_devkit_archive_is_one_line_naming_it(tiny_data, cli, tmp_path):
    from stages import synth

    synth.run(tmp_path / "tars", classes=2, train_per_class=1, val_per_class=1, fmt="tars")
    devkit = tmp_path / "tars" / "ILSVRC2012_devkit_t12.tar.gz"
    devkit.write_bytes(devkit.read_bytes()[: devkit.stat().st_size // 2])
    for args in (["--debug"], []):  # --debug: the traceback of what happened
        out = cli(*args, "shard", tmp_path / "tars", tmp_path / "val", "--split", "val", check=False)
        assert "Aborted" not in out.stderr
    one_line_error(out, str(devkit))


@pytest.mark.slow
def test_pca_stats_of_shards_with_no_samples_is_one_line(tiny_data, cli, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(tiny_data["work"] / "demo-data", tree)
    for image in (tree / "train").rglob("*.JPEG"):
        image.write_bytes(b"")  # every image empty: skipped, the split holds nothing
    cli("shard", tree, tmp_path / "train", "--split", "train", check=False)
    one_line_error(cli("pca-stats", tmp_path / "train", tmp_path / "pca", check=False),
                   "expected shards holding images, found none")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to run as nobody")
def test_an_unreadable_class_folder_is_one_line_naming_it(tiny_data):
    """As the user `nobody`, in a folder of /tmp that user may enter (pytest's own are root's alone)."""
    with tempfile.TemporaryDirectory() as place:
        tree = Path(place) / "tree"
        shutil.copytree(tiny_data["work"] / "demo-data", tree)
        Path(place).chmod(0o777)
        hidden = next((tree / "train").iterdir())
        hidden.chmod(0o000)
        out = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", CLI, "shard",
                              str(tree), f"{place}/out", "--split", "train"],
                             capture_output=True, text=True, env={**os.environ, "HOME": place})
        one_line_error(out, str(hidden), "permission denied")


@pytest.mark.slow
def test_out_of_memory_is_one_line_naming_what_to_lower(tiny_data, train_cmd, tmp_path):
    """The data segment limited to what the process uses after its imports plus 150 MB: the full-width net's
    first batch cannot be allocated (Python sees torch's allocation failure; the kernel's OOM killer, SIGKILL,
    is what no program can report)."""
    program = ("import re, resource, sys, torch, cli.main\n"
               "used = int(re.search(r'VmData:\\s+(\\d+) kB', open('/proc/self/status').read())[1]) << 10\n"
               "resource.setrlimit(resource.RLIMIT_DATA, (used + (150 << 20), resource.RLIM_INFINITY))\n"
               "sys.argv = ['alexnet-pipe'] + sys.argv[1:]\n"
               "cli.main.main()\n")
    args = train_cmd(tiny_data, tmp_path / "run", width="1.0", batch_size=32, loader="torch", max_steps=1,
                     checkpoint_every=None, log_every=None, keep_checkpoints=None)
    out = subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    one_line_error(out, "out of memory", "--batch-size")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_eval_on_a_read_only_disk_warns_about_a_damaged_newest_checkpoint_and_takes_the_one_before(
        tiny_data, tiny_run, cli, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        run = run_copy(tiny_run, disk)
        (run / "_stage.json").unlink()
        newest = run / "checkpoints" / "step-000000018.pt"
        newest.write_bytes(newest.read_bytes()[:1000])
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        out = cli("eval", run, "--val", tiny_data["val"], "--out", tmp_path / "eval", "--no-ten-crop")
        assert "warning:" in out.stderr and str(newest) in out.stderr
        assert json.loads((tmp_path / "eval" / "eval.json").read_text())["checkpoint"]["step"] == 15
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.slow
def test_eval_of_a_run_whose_newest_checkpoint_was_rotated_away_takes_the_next_without_a_warning(
        tiny_data, tiny_run, cli, tmp_path):
    run = run_copy(tiny_run, tmp_path)
    (run / "_stage.json").unlink()
    (run / "checkpoints" / "step-000000018.pt").unlink()  # removed by a rotation, its digest not yet
    out = cli("eval", run, "--val", tiny_data["val"], "--out", tmp_path / "eval", "--no-ten-crop")
    assert "warning" not in out.stderr
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["checkpoint"]["step"] == 15


@pytest.mark.slow
def test_a_saved_tensor_for_a_checkpoint_and_a_folder_for_an_output_file_are_one_line(tiny_data, cli, tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    one_line_error(cli("predict", tmp_path / "tensor.pt", tiny_data["work"] / "demo-data" / "val", check=False),
                   "tensor.pt: expected a checkpoint written by `alexnet-pipe train`, found a saved torch.Tensor")
    one_line_error(cli("preview", tiny_data["train"], "--pca", tiny_data["pca"], "--out", tmp_path, check=False),
                   str(tmp_path), "found a folder")
    one_line_error(cli("export", tmp_path / "tensor.pt", "--out", tmp_path, check=False), str(tmp_path),
                   ".pt2 or .onnx")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_log_line_that_does_not_fit_on_the_disk_is_one_line_naming_the_log_and_leaves_no_half_line(tmp_path):
    """metrics.jsonl and events.jsonl are appended by one function: a write cut short by a full disk is cut back
    off, so every reader finds whole lines only."""
    from pipeline.engine import append_line
    from pipeline.errors import PipeError

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        log = disk / METRICS
        append_line(log, json.dumps({"step": 1, "loss": 2.0}))
        (disk / "filler").write_bytes(b"x" * (56 << 10))  # leaves less than the next line needs
        before = log.read_bytes()
        with pytest.raises(PipeError, match=f"{log}: no space left on the device"):
            append_line(log, json.dumps({"step": 2, "loss": 2.0, "pad": "y" * (16 << 10)}))
        assert log.read_bytes() == before
    finally:
        subprocess.run(["umount", str(disk)])
