"""Run records (what a run or eval ran on), their place in eval.json and the report, and `status`'s view of runs."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pipeline.record import append_event, read_events, run_record
from pipeline.records import PillowBuild, RunRecord
from pipeline.status import run_progress

REPO = Path(__file__).resolve().parents[1]


def test_run_record_names_this_machines_software_hardware_and_checkout():
    import nvidia.dali
    import PIL
    import torchvision

    record = run_record()
    assert record.python == platform.python_version() and record.torch == torch.__version__
    assert record.torchvision == torchvision.__version__
    assert record.dali == nvidia.dali.__version__ and record.cpus == os.cpu_count()
    assert record.pillow == PillowBuild(PIL.__version__, "+simd" in PIL.__version__)
    assert record.gpus == tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    assert (record.cuda is None) == (not torch.cuda.is_available())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert record.git is not None and record.git.commit == head.strip() and len(head.strip()) == 40
    assert RunRecord.from_json(json.loads(json.dumps(record.to_json()))) == record  # plain JSON, read back whole


def test_a_torn_last_event_line_is_skipped(tmp_path):
    append_event(tmp_path, event="start", step=0, epoch=0)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"time": 1, "ev')  # a crash mid-write
    assert [(e.event, e.step) for e in read_events(tmp_path)] == [("start", 0)]


def write_run(run: Path, events: list[dict], metrics: list[dict]) -> None:
    run.mkdir(parents=True)
    (run / "_run.json").write_text("{}")  # what makes a folder a run for status
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


@pytest.mark.slow
def test_status_shows_each_runs_progress_rate_and_time_left(tiny_run, tmp_path):
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    shutil.copytree(tiny_run, work / "runs" / "finished")  # with its checkpoints: their newest that verifies counts
    # resumed at step 10 at t=1000 s, then 2 steps a second (64 images/s) for 20 steps, of 100
    step = {"epoch": 0, "loss": 1.0, "lr": 0.01, "images_per_s": 64.0}
    steps = [{"step": s, **step, "time": 900.0 + s} for s in range(1, 11)]
    steps += [{"step": 10 + i, **step, "time": 1000.0 + i / 2} for i in range(1, 21)]
    events = [{"time": 900.0, "event": "start", "step": 0, "epoch": 0, "total_steps": 100, "record": {}},
              {"time": 1000.0, "event": "resume", "step": 10, "epoch": 0, "total_steps": 100, "record": {}}]
    write_run(work / "runs" / "live", events, steps)
    rows = {r.run: asdict(r) for r in run_progress(work, now=1012.0)}
    assert list(rows) == ["runs/finished", "runs/live"]
    finished = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])
    logged = map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines())
    epoch_lines = [m for m in logged if "val_samples" in m]
    # epochs done, as train's own lines count them ("epoch 2/2: …", "2 epochs done"), not the last step's epoch index
    assert len(epoch_lines) == 2
    assert rows["runs/finished"] == {"run": "runs/finished", "step": 18, "total_steps": 18, "epochs_done": 2,
                                     "state": "done", "val_top1_error": finished["val_top1_error"],
                                     "steps_per_s": None, "images_per_s": None, "eta_s": None}
    assert rows["runs/live"] == {"run": "runs/live", "step": 30, "total_steps": 100, "epochs_done": 0,
                                 "state": "running", "val_top1_error": None, "steps_per_s": 2.0,
                                 "images_per_s": 64.0, "eta_s": 35}
    assert run_progress(work, now=1100.0)[1].state == "stopped"  # no line for 90 s: killed or hung


@pytest.mark.slow
def test_status_cli_prints_the_runs_table(tiny_run, cli, tmp_path):
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    shutil.copytree(tiny_run, work / "runs" / "tiny")
    out = cli("status", work).stdout
    lines = out.splitlines()
    runs = "\n".join(lines[next(i for i, line in enumerate(lines) if line.strip() == "runs"):])  # the 2nd table
    assert "runs/tiny" in runs and "done" in runs and "18/18" in runs


def test_a_run_from_uncommitted_code_keeps_the_diff_that_rebuilds_it(tmp_path, monkeypatch):
    """A train start records the commit; when the code differs from it (a changed file, a new module), the run
    folder keeps `git diff` of it beside events.jsonl, named by its sha256, and applying it to the commit gives back
    the files that ran."""
    import hashlib

    from pipeline import record

    repo, run = tmp_path / "repo", tmp_path / "run"
    (repo / "pipeline").mkdir(parents=True)
    run.mkdir()

    def git(*args: str, cwd: Path = repo) -> str:
        return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (repo / "pipeline" / "model.py").write_text("WIDTH = 1.0\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    monkeypatch.setattr(record, "PROJECT_ROOT", repo)
    assert "code_diff" not in record.append_event(run, "start", step=0, epoch=0).to_json()  # the commit: no diff

    (repo / "pipeline" / "model.py").write_text("WIDTH = 0.5\n")
    (repo / "pipeline" / "new.py").write_text("NEW = True\n")
    (repo / "notes.txt").write_text("not code\n")
    event = record.append_event(run, "resume", step=3, epoch=0)
    assert event.code_diff is not None and event.record.git is not None
    diff = (run / event.code_diff.file).read_bytes()
    assert event.code_diff.sha256 == hashlib.sha256(diff).hexdigest() and event.record.git.modified
    assert read_events(run)[-1].code_diff == event.code_diff

    rebuilt = tmp_path / "rebuilt"
    git("clone", "-q", str(repo), str(rebuilt), cwd=tmp_path)
    subprocess.run(["git", "-C", str(rebuilt), "apply", str(run / event.code_diff.file)], check=True)
    assert (rebuilt / "pipeline" / "model.py").read_text() == "WIDTH = 0.5\n"
    assert (rebuilt / "pipeline" / "new.py").read_text() == "NEW = True\n"
    assert not (rebuilt / "notes.txt").exists()  # not under a code folder
