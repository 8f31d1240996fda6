"""The train stage through the CLI on a tiny generated set: SIGKILL and resume, determinism, caching, refusing
other settings on the same run folder, --force, extending a finished run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.artifacts import RunSpec

TIMING = ("images_per_s", "data_wait", "step_ms", "time")  # the only fields of metrics.jsonl that may differ
STEPS_PER_EPOCH, EPOCHS = 9, 2  # 36 images, batch 4 (conftest TINY_TRAIN)


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))


def last_checkpoint(run: Path) -> dict:
    return torch.load(sorted((run / "checkpoints").glob("step-*.pt"))[-1], map_location="cpu", weights_only=True)


def files_and_times(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")
            if p.is_file() and ".locks" not in p.parts}


def said(out) -> str:
    return out.stdout + out.stderr


def kill_when_written(cli_popen, args: list[str], path: Path, log: Path, timeout: float = 120) -> None:
    """Start `alexnet-pipe ARGS`, SIGKILL its whole process group as soon as `path` exists."""
    proc = cli_popen(*args, log=log)
    deadline = time.monotonic() + timeout
    try:
        while not path.exists():
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {path.name}:\n" \
                                        f"{log.read_text()}"
            assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_epoch_then_rerun_ends_with_the_weights_and_metrics_of_an_uninterrupted_run(
        tiny_data, tiny_run, train_cmd, cli, cli_popen, tmp_path):
    out = tmp_path / "run"
    args = train_cmd(tiny_data, out)
    for step in (3, 12):  # killed in epoch 0, then the resumed run killed again in epoch 1
        kill_when_written(cli_popen, args, out / "checkpoints" / f"step-{step:09d}.pt", tmp_path / f"kill-{step}.log")
        assert not (out / "_stage.json").exists()
        state = last_checkpoint(out)
        assert state["step"] % STEPS_PER_EPOCH and state["loader"]["batches"] > 0, "not killed mid-epoch"
        assert state["epoch"] == step // STEPS_PER_EPOCH
    resumed = cli(*args)
    assert "up to date" not in said(resumed)
    assert metrics(out) == metrics(tiny_run)
    # events.jsonl: the start and each resume, with the step and checkpoint it resumed from, and what it ran on
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"], e["total_steps"]) for e in events] == [("start", 0, 18), ("resume", 3, 18),
                                                                           ("resume", 12, 18)]
    assert [e["resumed_from"] for e in events] == [None, *(str(out / "checkpoints" / f"step-{s:09d}.pt")
                                                           for s in (3, 12))]
    assert all(e["record"]["torch"] == torch.__version__ and " train " in e["record"]["command"] for e in events)
    times = [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert times == sorted(times) and events[0]["time"] <= times[0] and times[-1] <= time.time()
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    got, want = last_checkpoint(out), last_checkpoint(tiny_run)
    assert (got["step"], got["epoch"]) == (want["step"], want["epoch"]) == (EPOCHS * STEPS_PER_EPOCH, EPOCHS)
    for name, tensor in want["model"].items():
        assert torch.allclose(got["model"][name], tensor, atol=1e-6, rtol=0), name
    momentum = [s["momentum_buffer"] for s in want["optimizer"]["state"].values()]
    assert all(torch.allclose(a["momentum_buffer"], b, atol=1e-6, rtol=0)
               for a, b in zip(got["optimizer"]["state"].values(), momentum, strict=True))
    assert got["scheduler"] == want["scheduler"]


def test_two_runs_with_one_seed_log_identical_losses_and_end_with_identical_weights(tiny_data, tiny_run, train_cmd,
                                                                                     cli, tmp_path):
    cli(*train_cmd(tiny_data, tmp_path / "again"))
    logged = metrics(tmp_path / "again")
    assert logged == metrics(tiny_run)
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == EPOCHS * STEPS_PER_EPOCH and len(set(losses)) > 1  # the weights moved
    got, want = last_checkpoint(tmp_path / "again")["model"], last_checkpoint(tiny_run)["model"]
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())
    cli(*train_cmd(tiny_data, tmp_path / "seed1", seed=1, max_steps=2))
    assert [r["loss"] for r in metrics(tmp_path / "seed1")] != losses[:2]  # the seed matters


def test_rerunning_a_finished_run_says_up_to_date_and_touches_nothing(tiny_data, tiny_run, train_cmd, cli):
    before = files_and_times(tiny_run)
    out = cli(*train_cmd(tiny_data, tiny_run))
    assert "up to date" in said(out)
    assert files_and_times(tiny_run) == before


def test_an_up_to_date_run_answers_without_importing_torch(tiny_data, tiny_run, train_cmd):
    """`make train` calls train every time: finding the run finished must not cost torch's import (~2 s)."""
    code = ("import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
            f"from cli.main import app; app({train_cmd(tiny_data, tiny_run)!r})")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert "up to date" in probe.stdout + probe.stderr
    assert "torch imported: False" in probe.stdout


def test_another_lr_on_the_same_run_is_refused_in_one_line_and_force_starts_over(tiny_data, tiny_run, train_cmd, cli,
                                                                                   tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = files_and_times(run)
    refused = cli(*train_cmd(tiny_data, run, lr=0.01), check=False)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.lr" in lines[0] and "--force" in lines[0]
    assert "Traceback" not in refused.stderr
    assert files_and_times(run) == before

    cli(*train_cmd(tiny_data, run, lr=0.01, max_steps=2, force=True))
    logged = metrics(run)
    assert [r["step"] for r in logged] == [1, 2] and {r["lr"] for r in logged} == {0.01}
    original = [r["loss"] for r in metrics(tiny_run) if "loss" in r]
    assert logged[0]["loss"] == original[0]  # step 1 starts from the same initial weights and batch …
    assert logged[1]["loss"] != original[1]  # … and its larger step changes step 2
    assert checkpoints(run) == ["step-000000002.pt"]
    assert json.loads((run / "_run.json").read_text())["settings"]["train"]["lr"] == 0.01
    assert "up to date" in said(cli(*train_cmd(tiny_data, run, lr=0.01, max_steps=2)))


def test_more_epochs_extend_a_finished_run_from_its_last_checkpoint(tiny_data, tiny_run, train_cmd, cli, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    original = (tiny_run / "metrics.jsonl").read_text()
    out = cli(*train_cmd(tiny_data, run, epochs=EPOCHS + 1))
    assert "up to date" not in said(out)
    text = (run / "metrics.jsonl").read_text()
    assert text.startswith(original)  # the first two epochs were not redone
    added = [json.loads(line) for line in text[len(original):].splitlines()]
    total = (EPOCHS + 1) * STEPS_PER_EPOCH
    assert [r["step"] for r in added if "loss" in r] == list(range(EPOCHS * STEPS_PER_EPOCH + 1, total + 1))
    assert [(r["epoch"], r["step"]) for r in added if "val_top1_error" in r] == [(EPOCHS, total)]
    state = last_checkpoint(run)
    assert (state["step"], state["epoch"]) == (total, EPOCHS + 1)
    assert (run / "_stage.json").is_file()
    assert "up to date" in said(cli(*train_cmd(tiny_data, run, epochs=EPOCHS + 1)))


@pytest.mark.parametrize("bad,expected", [({"batch_size": 64}, "fewer than one global batch"),
                                          ({"width": -1}, "width must be > 0")])
def test_impossible_settings_are_one_line_errors(tiny_data, train_cmd, cli, tmp_path, bad, expected):
    out = cli(*train_cmd(tiny_data, tmp_path / "run", **bad), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], out.stderr


def test_torchrun_with_two_ranks_trains_one_run_and_a_rerun_is_up_to_date(tiny_data, train_cmd, tmp_path):
    """The README's distributed command, without Slurm: two DDP ranks (gloo on the CPU) write one run."""
    run = tmp_path / "run"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "--no-python",
                str(Path(sys.executable).with_name("alexnet-pipe"))]
    args = train_cmd(tiny_data, run, max_steps=2, checkpoint_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(torchrun + args, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "rank 0/2" in said(out) and "rank 1/2" in said(out)
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2]  # rank 0 logs, once per step
    state = last_checkpoint(run)
    assert (state["step"], RunSpec.of_checkpoint(state).topology.world_size) == (2, 2)
    rerun = subprocess.run(torchrun + args, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0 and "up to date" in said(rerun), rerun.stderr


def _pca_copy(tiny_data, where: Path, nudge: float) -> Path:
    """A finished pca-stats folder like the tiny set's whose covariance (so its eigenvalues) is scaled by 1 + `nudge`:
    new bytes, and the same PCA when the nudge is round-off."""
    folder = where / "pca"
    shutil.copytree(tiny_data["pca"].parent, folder)
    pca = json.loads((folder / "pca.json").read_text())
    pca["eigvals"] = [v * (1 + nudge) for v in pca["eigvals"]]
    pca["cov"] = [[v * (1 + nudge) for v in row] for row in pca["cov"]]
    (folder / "pca.json").write_text(json.dumps(pca))
    return folder / "pca.json"


def test_a_run_goes_on_with_a_recomputed_pca_json_that_holds_the_same_pca(tiny_data, tiny_run, train_cmd, cli,
                                                                          tmp_path):
    """pca-stats' upgrade rewrites pca.json with the same numbers in other last bits: a run in progress (or
    finished) adopts it and is not started over; a pca.json with other numbers is refused as before."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    recomputed = {**tiny_data, "pca": _pca_copy(tiny_data, tmp_path / "recomputed", 3e-16)}
    out = cli(*train_cmd(recomputed, run))
    assert "the run goes on with it" in said(out) and "largest difference" in said(out)
    assert metrics(run) == metrics(tiny_run) and checkpoints(run) == checkpoints(tiny_run)  # nothing retrained
    assert json.loads((run / "_run.json").read_text())["settings"]["inputs"]["pca"] == \
        "sha256:" + hashlib.sha256(recomputed["pca"].read_bytes()).hexdigest()
    assert "up to date" in said(cli(*train_cmd(recomputed, run)))

    other = {**tiny_data, "pca": _pca_copy(tiny_data, tmp_path / "other", 1e-3)}
    refused = cli(*train_cmd(other, run), check=False)
    assert refused.returncode == 2 and "changed: inputs.pca" in refused.stderr
