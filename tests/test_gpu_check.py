"""bench/gpu.sh, the GPU check, in its dry run on the CPU (QUICK=1 DEVICE=cpu: tiny sizes, no compile, the two-tower
model only): every step runs through the real CLI, DALI and torch; exactly three files come back."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_dry_run_from_another_folder_leaves_three_files_and_every_step_ok(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "PY": sys.executable, "DALI_SITE": str(tmp_path / "none"),
           "BUDGET": "600"}  # a loaded CI machine may be slow; nothing may be skipped here
    done = subprocess.run([str(ROOT / "bench" / "gpu.sh"), str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.json", "summary.md"]
    work = Path(re.search(r"(/tmp/gpu-check\.\w+)/", done.stdout).group(1))
    assert not work.exists()  # the work folder lived under /tmp and is gone

    summary = json.loads((out / "summary.json").read_text())
    assert {name: s["status"] for name, s in summary["steps"].items()} == dict.fromkeys(
        ["cli-eval", "cli-train", "learning", "loader-ten-crop-gpu", "loader-train-gpu", "pca", "shard",
         "shard-val", "synth-e2e", "train-step-fp32"], "ok")
    results = summary["results"]
    assert results["record"][0]["dali"] == "2.4.0" and results["record"][0]["gpus"] == []
    assert {(r["kind"], r["loader"]) for rows in results.values() for r in rows if r.get("bench") == "loader"} == {
        ("train", "dali"), ("train", "dali-full-decode"), ("train", "torch"), ("10-crop", "dali"),
        ("10-crop", "torch")}
    assert [(r["model"], r["precision"]) for r in results["train-step-fp32"] if "model" in r] == [("two-tower", "fp32")]
    assert [r["init"] for r in results["learning"][0]["runs"]] == ["paper", "default"]
    run = summary["runs"]["one-gpu"]
    assert run["last_step"] == 4 and run["images_per_s"] > 0 and 0 <= run["data_wait"] < 1 and run["step_ms"] > 0
    assert run["mfu"] is None  # no peak known for a CPU
    assert summary["eval"]["one-gpu"]["ten_crop"] > 0

    assert (out / "logs.tar.gz").stat().st_size <= 16 * 1024 * 1024
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/cli-train.log", "eval/one-gpu/eval.json"} <= set(tar.getnames())
        lines = tar.extractfile("runs/one-gpu/metrics.jsonl").read().decode().splitlines()
    logged = [json.loads(line) for line in lines if '"loss"' in line]
    assert logged and all({"data_wait", "step_ms", "mfu", "precision"} <= set(r) for r in logged)
    md = (out / "summary.md").read_text()
    assert f"| one-gpu | {run['logged_steps']} | {run['images_per_s']} | {run['data_wait']} |" in md


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_placement_check_finds_two_devices_equal_to_one_on_the_cpu_twin(gpu_check):
    found = gpu_check.placement(argparse.Namespace(devices="cpu,cpu", width=0.125))
    assert found["equal"] is True and found["max_abs_logit_diff"] < 1e-4 and found["devices"] == ["cpu", "cpu"]


def test_the_clock_check_sees_a_slower_loader_as_more_waiting_on_the_cpu_twin(gpu_check):
    # steps of ~10 ms, so that sleep's jitter on a busy machine stays far below a quarter of one
    found = gpu_check.clock(argparse.Namespace(device="cpu", size=512, matmuls=8, steps=5))
    # on the CPU the host's share: 1/5 and 3/4 on a quiet machine (exact bounds: tests/test_speed.py)
    assert 0 < found["quarter_step_loader"] < found["three_step_loader"] < 1 and found["step_ms"] > 0
