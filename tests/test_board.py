"""TensorBoard events through the real CLI, read back with TensorBoard's own reader: a run's scalars equal
metrics.jsonl's, also after a SIGKILL between checkpoints and a resume (no step twice, no stale step); eval's errors
equal eval.json's; a full disk under the events is one warning and the run ends as it would; `make tensorboard`
serves the run's tags over its HTTP data API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import REPO, event_scalars

SKIPPED = ("step", "epoch", "time", "val_samples")  # metrics.jsonl fields that are not curves


def expected_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What the events must hold, from metrics.jsonl alone: each number of each line at its step, under
    step/<field> or epoch/<field>, and each epoch's gap (val − train top-1 error)."""
    want: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        kind = "epoch" if "val_top1_error" in record else "step"
        for key, value in record.items():
            if key not in SKIPPED and isinstance(value, int | float) and not isinstance(value, bool):
                want.setdefault(f"{kind}/{key}", []).append((record["step"], value))
        if kind == "epoch" and record["train_top1_error"] is not None:
            want.setdefault("epoch/gap_top1", []).append(
                (record["step"], record["val_top1_error"] - record["train_top1_error"]))
    return want


def assert_events_equal_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    got, want = event_scalars(run / "tb"), expected_scalars(run)
    assert {t for t in got if t.startswith(("step/", "epoch/"))} == set(want)  # mfu on a CPU: left out, not 0
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # every step once, in order
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-9), tag
    return got


def kill_when_logged(cli_popen, args: list, run: Path, step: int, log: Path) -> None:
    """Start the run, SIGKILL it once metrics.jsonl has logged `step`."""
    proc = cli_popen(*args, log=log)
    deadline = time.monotonic() + 120
    try:
        while not any(json.loads(line).get("step", 0) >= step for line in
                      ((run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else [])):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_a_run_killed_between_checkpoints_and_resumed_has_the_events_of_its_metrics(
        tiny_data, tiny_run, train_cmd, cli, cli_popen, tmp_path):
    out = tmp_path / "run"
    args = train_cmd(tiny_data, out)
    kill_when_logged(cli_popen, args, out, 5, tmp_path / "kill.log")  # checkpoint at step 3; steps 4, 5 logged
    assert max(s for s, _ in event_scalars(out / "tb")["step/loss"]) >= 4  # events past the checkpoint
    cli(*args)
    got = assert_events_equal_metrics(out)
    assert got["step/loss"] == event_scalars(tiny_run / "tb")["step/loss"]  # the uninterrupted run's curve
    assert assert_events_equal_metrics(tiny_run).keys() == got.keys()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [i.step for i in events.Images("inputs/augmented")] == [0]  # the fresh start's, once
    assert events.Images("inputs/augmented")[0].width > 224  # a grid of the augmented inputs
    epoch_ends = [s for s, _ in got["epoch/val_top1_error"]]
    assert epoch_ends == [9, 18]
    for tower in "AB":
        assert [i.step for i in events.Images(f"conv1/tower_{tower}")] == epoch_ends
    settings = events.Tensors("settings/text_summary")
    assert [t.step for t in settings] == [0]
    assert json.loads(settings[0].tensor_proto.string_val[0].decode().strip("`").removeprefix("json"))["train"][
        "lr"] == 0.003
    final = torch.load(out / "checkpoints" / "step-000000018.pt", map_location="cpu", weights_only=True)["model"]
    for name, tensor in final.items():  # the norms at the last epoch's end are those of the final weights
        assert got[f"weight_norm/{name}"][-1] == (18, pytest.approx(tensor.norm().item(), rel=1e-5))
        assert got[f"grad_norm/{name}"][-1][0] == 18 and got[f"grad_norm/{name}"][-1][1] > 0


@pytest.mark.slow
def test_eval_writes_the_errors_of_eval_json_and_the_per_class_accuracy(tiny_data, tiny_run, cli, tmp_path):
    out = tmp_path / "eval"
    cli("eval", tiny_run, "--val", tiny_data["val"], "--train", tiny_data["train"], "--out", out,
        "--neighbour-train-images", 0, "--devices", "cpu")
    result = json.loads((out / "eval.json").read_text())
    got = event_scalars(out / "tb")
    step = result["checkpoint"]["step"]
    for test in ("centre", "ten_crop", "train_centre"):
        for field in ("top1_error", "top5_error"):
            assert got[f"eval/{test}_{field}"] == [(step, pytest.approx(result[test][field], abs=1e-7))]
    assert got["eval/gap_top1"] == [(step, pytest.approx(result["centre"]["top1_error"] -
                                                         result["train_centre"]["top1_error"], abs=1e-7))]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"histograms": 0, "tensors": 0})
    events.Reload()
    histogram = events.Histograms("eval/per_class_top1_accuracy")[0].histogram_value
    assert histogram.num == len(result["per_class"])
    assert histogram.sum == pytest.approx(sum(c["top1_accuracy"] for c in result["per_class"]))
    table = events.Tensors("eval/per_class/text_summary")[0].tensor_proto.string_val[0].decode()
    assert all(c["wnid"] in table for c in result["per_class"])


@pytest.mark.slow
def test_a_full_disk_under_the_events_is_one_warning_and_the_run_ends_as_it_would(
        tiny_data, tiny_run, train_cmd, cli, small_disk, tmp_path):
    disk, _ = small_disk
    out = tmp_path / "run"
    out.mkdir()
    (out / "tb").symlink_to(disk)  # the events on a small disk, nearly full; everything else where it was
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * (free - 16384))
    done = cli(*train_cmd(tiny_data, out, epochs=1))
    warnings = [line for line in done.stderr.splitlines() if "tensorboard" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: tensorboard: no more events in {out / 'tb'}: "
                                                         "No space left on device; the work goes on"), done.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(line)["step"] for line in (tiny_run / "metrics.jsonl").read_text().splitlines()][:10]
    assert (out / "checkpoints" / "step-000000009.pt").is_file()
    quiet = tmp_path / "quiet"
    cli(*train_cmd(tiny_data, quiet, max_steps=1, no_tensorboard=True))
    assert (quiet / "metrics.jsonl").is_file() and not (quiet / "tb").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_make_tensorboard_serves_the_runs_scalar_tags_over_http(tiny_run, cli, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny_run, work / "runs" / "tiny")
    status = cli("status", work)
    assert f"TensorBoard events in {work}: runs/tiny/tb. See them: make tensorboard WORK={work}" in status.stdout
    venv, port = Path(sys.executable).parents[1], free_port()  # the venv running the tests, wherever the tree is
    server = subprocess.Popen(["make", "-s", "-o", f"{venv}/.setup-stamp", "tensorboard", f"VENV={venv}",
                               f"WORK={work}", f"TENSORBOARD_PORT={port}"], cwd=REPO, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        tags, deadline = {}, time.monotonic() + 90
        while "runs/tiny/tb" not in tags and time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert set(tags["runs/tiny/tb"]) == set(event_scalars(tiny_run / "tb"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=runs/tiny/tb&"
                                    "tag=step/loss", timeout=5) as r:
            served = json.loads(r.read())  # [wall_time, step, value] each
        assert [(s, pytest.approx(v)) for _, s, v in served] == event_scalars(tiny_run / "tb")["step/loss"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
