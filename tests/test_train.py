"""The train stage through the CLI on a tiny generated set: SIGKILL, SIGTERM and Ctrl-C then resume, determinism,
caching, other settings refused on a run folder, --force, extended runs, damaged checkpoints, another rank count,
inputs refused before the folder is claimed, class checks, the learning-rate schedules, a full disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

from pipeline.config import TrainConfig
from pipeline.errors import PipeError
from pipeline.records import Manifest, RunSpec, Topology
from pipeline.sources import run_classes, val_class_problems
from pipeline.train.guard import flat_loss
from pipeline.train.schedule import at_chance, make_scheduler, schedule_epoch

TIMING = ("images_per_s", "data_wait", "step_ms", "time")  # the only fields of metrics.jsonl that may differ
STEPS_PER_EPOCH, EPOCHS = 9, 2  # 36 images, batch 4 (conftest TINY_TRAIN)
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--no-python"]
CLI = str(Path(sys.executable).with_name("alexnet-pipe"))


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


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_sigkill_mid_epoch_then_rerun_ends_with_the_weights_and_metrics_of_an_uninterrupted_run(
        loader, tiny_data, tiny_run, train_cmd, cli, cli_popen, tmp_path):
    """Either loader: its batches are the same, so the uninterrupted reference is the DALI run (tiny_run)."""
    out = tmp_path / "run"
    args = train_cmd(tiny_data, out, loader=loader)
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_rerunning_a_finished_run_says_up_to_date_and_touches_nothing(tiny_data, tiny_run, train_cmd, cli):
    before = files_and_times(tiny_run)
    out = cli(*train_cmd(tiny_data, tiny_run))
    assert "up to date" in said(out)
    assert files_and_times(tiny_run) == before


@pytest.mark.slow
def test_an_up_to_date_run_answers_without_importing_torch(tiny_data, tiny_run, train_cmd):
    """`make train` calls train every time: finding the run finished must not cost torch's import (~2 s)."""
    code = ("import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
            f"from cli.main import app; app({train_cmd(tiny_data, tiny_run)!r})")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert "up to date" in probe.stdout + probe.stderr
    assert "torch imported: False" in probe.stdout


@pytest.mark.slow
def test_another_lr_on_the_same_run_is_refused_in_one_line_and_force_starts_over(tiny_data, tiny_run, train_cmd, cli,
                                                                                   tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = files_and_times(run)
    refused = cli(*train_cmd(tiny_data, run, lr=0.01), check=False)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--force" in lines[0]
    assert "train.lr 0.003 → 0.01" in lines[0]
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("bad,expected", [({"batch_size": 64}, "fewer than one global batch"),
                                          ({"width": -1}, "width must be > 0")])
def test_impossible_settings_are_one_line_errors(tiny_data, train_cmd, cli, tmp_path, bad, expected):
    out = cli(*train_cmd(tiny_data, tmp_path / "run", **bad), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], out.stderr


@pytest.mark.slow
def test_two_ranks_resume_a_one_rank_checkpoint_along_the_one_rank_losses_and_a_rerun_is_up_to_date(
        tiny_data, tiny_run, train_cmd, tmp_path):
    """The README's distributed command, without Slurm: two DDP ranks (gloo on the CPU) write one run; started
    from the one-rank run's checkpoint at step 12, they train the same global batches to the same losses."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for later in ("step-000000015.pt", "step-000000018.pt"):
        (run / "checkpoints" / later).unlink()
        (run / "checkpoints" / f"{later}.sha256").unlink()
    (run / "_stage.json").unlink()
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "--no-python",
                str(Path(sys.executable).with_name("alexnet-pipe"))]
    args = train_cmd(tiny_data, run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(torchrun + args, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "rank 0/2" in said(out) and "rank 1/2" in said(out) and "on 2 rank(s), written by 1" in said(out)
    ours, theirs = losses_of(run), losses_of(tiny_run)
    assert sorted(ours) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))  # rank 0 logs, once per step
    worst = max(abs(ours[k] - theirs[k]) for k in range(13, EPOCHS * STEPS_PER_EPOCH + 1))
    assert worst < LOSS_TOLERANCE, f"largest loss difference {worst:.3g}"
    state = last_checkpoint(run)
    assert (state["step"], RunSpec.of_checkpoint(state).topology.world_size) == (18, 2)
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


@pytest.mark.slow
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
    assert refused.returncode == 2 and "other settings (inputs.pca " in refused.stderr




def same_weights(run: Path, reference: Path) -> None:
    got, want = last_checkpoint(run), last_checkpoint(reference)
    assert (got["step"], got["epoch"]) == (want["step"], want["epoch"])
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
    assert got["scheduler"] == want["scheduler"]


def wait_for_step(run: Path, proc: subprocess.Popen, log: Path, step: int, timeout: float = 120) -> None:
    """Until metrics.jsonl has logged `step` (a step boundary just passed)."""
    deadline = time.monotonic() + timeout
    while not (run / "metrics.jsonl").is_file() or \
            step not in [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]:
        assert proc.poll() is None, f"ended (exit {proc.returncode}) before step {step}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_sigterm_mid_epoch_checkpoints_exits_0_and_a_rerun_ends_with_the_weights_of_an_uninterrupted_run(
        loader, tiny_data, tiny_run, train_cmd, cli, cli_popen, tmp_path):
    out, log = tmp_path / "run", tmp_path / "term.log"
    args = train_cmd(tiny_data, out, loader=loader)
    proc = cli_popen(*args, log=log)
    wait_for_step(out, proc, log, 4)  # the checkpoint cadence is 3: step 4's boundary is not a checkpoint
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()
    stopped = last_checkpoint(out)
    assert stopped["step"] % 3 and stopped["loader"]["batches"] > 0, "the stop was not mid-epoch, off-cadence"
    assert f"train: stopped at step {stopped['step']} (SIGTERM), rerun to resume" in log.read_text()
    assert not (out / "_stage.json").exists()
    logged = [r["step"] for r in metrics(out)]
    assert logged == list(range(1, stopped["step"] + 1))  # no completed step is lost
    resumed = cli(*args)
    assert f"resuming from step {stopped['step']}, epoch 0" in said(resumed)
    assert metrics(out) == metrics(tiny_run)
    same_weights(out, tiny_run)


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_checkpoints_at_the_next_step_and_exits_130(tiny_data, train_cmd, cli_popen,
                                                                               tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, the torch loader's workers too: they ignore it, and the
    run stops at a step boundary with a checkpoint (exit 130, so `train && eval` stops there as well)."""
    out, log = tmp_path / "run", tmp_path / "int.log"
    proc = cli_popen(*train_cmd(tiny_data, out, loader="torch", loader_threads=1), log=log)
    wait_for_step(out, proc, log, 4)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()
    stopped = last_checkpoint(out)
    text = log.read_text()
    assert "train: Ctrl-C: stopping at the next step with a checkpoint" in text and "Traceback" not in text, text
    assert f"train: stopped at step {stopped['step']} (SIGINT), rerun to resume" in text and stopped["step"] >= 4
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped["step"] + 1))


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tiny_data, tiny_run,
                                                                                         train_cmd, cli, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "_stage.json").unlink()  # as if killed before it finalized
    newest = run / "checkpoints" / "step-000000018.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short

    named = cli("eval", newest, "--val", tiny_data["val"], "--out", tmp_path / "eval", check=False)
    one_line_error(named, str(newest), "damaged")

    resumed = cli(*train_cmd(tiny_data, run))
    text = said(resumed)
    assert "warning: checkpoint" in text and str(newest) in text and "set aside as step-000000018.pt.damaged" in text
    assert "resuming from step 15, epoch 1" in text
    assert (run / "checkpoints" / "step-000000018.pt.damaged").is_file()
    assert metrics(run) == metrics(tiny_run)
    same_weights(run, tiny_run)

    for path in (run / "checkpoints").glob("step-*.pt"):  # every checkpoint damaged (18 replaces its .damaged)
        path.write_bytes(b"not a checkpoint")
    (run / "_stage.json").unlink()
    one_line_error(cli("eval", run, "--val", tiny_data["val"], "--out", tmp_path / "eval", check=False),
                   "no checkpoint verifies (3 set aside", warnings=3)
    assert len(list((run / "checkpoints").glob("*.damaged"))) == 3 and not checkpoints(run)
    one_line_error(cli(*train_cmd(tiny_data, run), check=False), "no checkpoint verifies (3 set aside", "--force")


@pytest.mark.slow
def test_wrong_inputs_are_refused_before_the_run_folder_is_claimed_and_a_fresh_start_empties_metrics(
        tiny_data, train_cmd, cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')  # killed before step 3
    one_line_error(cli(*train_cmd(tiny_data, run, batch_size=100000), check=False), "fewer than one global batch")
    one_line_error(cli(*train_cmd({**tiny_data, "val": tiny_data["train"]}, run), check=False),
                   f"--val: {tiny_data['train']}", "expected val shards", "'train'")
    one_line_error(cli(*train_cmd({**tiny_data, "train": tiny_data["val"]}, run), check=False), "expected train")
    one_line_error(cli(*train_cmd(tiny_data, run, devices="cuda:7"), check=False), "cuda:7")
    assert not (run / "_run.json").exists()  # nothing claimed: the corrected command is not "other settings"
    cli(*train_cmd(tiny_data, run, max_steps=2))
    assert [r["step"] for r in metrics(run)] == [1, 2] and all(r["loss"] != 9.0 for r in metrics(run))


LOSS_TOLERANCE = 1e-4  # the world size changes only the order of float sums (measured: below 1e-5 on this net)


def losses_of(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """torchrun's rank processes by their RANK."""
    ranks = {}
    for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        ranks[next(int(e[5:]) for e in environ if e.startswith(b"RANK="))] = int(child)
    return ranks


@pytest.mark.slow
def test_two_ranks_signalled_at_different_moments_stop_at_one_step_and_one_rank_resumes_the_same_global_batches(
        tiny_data, tiny_run, train_cmd, cli, tmp_path):
    """Elastic: the two-rank run follows the one-rank run's losses (the same global batches, crops and dropout
    masks; only float sums differ), both ranks stop at one step however apart their signals came, and a single
    process resumes the run from there to the one-rank run's end."""
    run, log = tmp_path / "run", tmp_path / "ranks.log"
    args = train_cmd(tiny_data, run)
    with open(log, "w") as f:
        proc = subprocess.Popen(TORCHRUN + ["--nproc_per_node=2", CLI] + args, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        wait_for_step(run, proc, log, 3)
        ranks = rank_pids(proc)
        os.kill(ranks[1], signal.SIGTERM)  # one rank first, as a node's signal may reach one process first …
        wait_for_step(run, proc, log, 4)
        os.kill(ranks[0], signal.SIGTERM)  # … and the other a step later
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    state = last_checkpoint(run)
    assert log.read_text().count(f"train: stopped at step {state['step']} (SIGTERM)") == 1, log.read_text()
    assert RunSpec.of_checkpoint(state).topology == Topology(order=2, global_batch=4, world_size=2)
    assert checkpoints(run)[-1] == f"step-{state['step']:09d}.pt" and state["step"] < EPOCHS * STEPS_PER_EPOCH

    resumed = cli(*train_cmd(tiny_data, run))  # one process now
    assert f"resuming from step {state['step']}" in said(resumed) and "on 1 rank(s), written by 2" in said(resumed)
    ours, theirs = losses_of(run), losses_of(tiny_run)
    assert sorted(ours) == sorted(theirs) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    worst = max(abs(ours[k] - theirs[k]) for k in theirs)
    assert worst < LOSS_TOLERANCE, f"largest loss difference {worst:.3g}"


@pytest.mark.slow
def test_val_shards_made_with_another_class_list_are_refused_naming_the_first_difference(
        tiny_data, levelled_checkpoint, train_cmd, cli, tmp_path):
    manifest = json.loads((tiny_data["val"] / "manifest.json").read_text())
    wnids = [c["wnid"] for c in manifest["classes"]]
    classes = tmp_path / "classes.txt"  # the val wnids first, in reverse order: every index moves
    classes.write_text("".join(f"{w} class {w}\n" for w in reversed(wnids)))
    other = tmp_path / "val-other"
    cli("shard", tiny_data["work"] / "demo-data", other, "--split", "val", "--shard-size", 8, "--classes", classes)
    first = json.loads((other / "manifest.json").read_text())["classes"][0]
    expected = f"val class {first['index']} is {first['wnid']} but the model's class {first['index']} is "
    one_line_error(cli("eval", levelled_checkpoint, "--val", other, "--out", tmp_path / "eval", check=False),
                   expected)
    one_line_error(cli(*train_cmd({**tiny_data, "val": other}, tmp_path / "run"), check=False), expected)


def test_a_val_class_never_trained_on_is_refused_unless_accepted_then_a_warning(tiny_data):
    from dataclasses import replace

    val, train = Manifest.read(tiny_data["val"]), Manifest.read(tiny_data["train"])
    table = run_classes(replace(train, classes=train.classes[1:]), val)  # train lacks the first val class
    with pytest.raises(PipeError, match=f"found 1 they lack \\({val.classes[0].wnid}\\); shard both splits"):
        val_class_problems(table, val, tiny_data["val"])
    problems = val_class_problems(table, val, tiny_data["val"], untrained_allowed=True)
    assert len(problems) == 1 and val.classes[0].wnid in problems[0] and "never trained on" in problems[0]
    assert val_class_problems(run_classes(train, val), val, tiny_data["val"]) == []


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)


def test_the_plateau_rule_never_drops_the_lr_at_chance_level_and_says_when_and_why_it_drops():
    optimizer = _optimizer()
    scheduler = make_scheduler(optimizer, TrainConfig(lr_patience=1))
    chance = 1 - 1 / 1000
    for _ in range(6):  # §5's init: six epochs at chance, every one "not improving"
        record = schedule_epoch(scheduler, optimizer, chance, 1000)
        assert record.lr_held and record.lr_drop is None
    assert optimizer.param_groups[0]["lr"] == 0.01
    drops = [schedule_epoch(scheduler, optimizer, error, 1000) for error in (0.9, 0.8, 0.8, 0.8)]
    assert [r.lr_drop is not None for r in drops] == [False, False, False, True]
    assert "0.01 → 0.001" in drops[-1].lr_drop and "has not improved on 0.8000" in drops[-1].lr_drop
    assert at_chance(0.84, 6) and not at_chance(0.7, 6)


def test_the_step_schedule_divides_the_lr_by_ten_at_its_milestones_at_most_lr_drops_times():
    optimizer = _optimizer()
    scheduler = make_scheduler(optimizer, TrainConfig(lr_schedule="step", lr_step_epochs=2, lr_drops=2))
    lrs = []
    for _ in range(8):
        optimizer.step()
        record = schedule_epoch(scheduler, optimizer, 0.999, 1000)  # a step schedule ignores the val error
        lrs.append((optimizer.param_groups[0]["lr"], record.lr_drop is not None))
    assert [round(lr, 8) for lr, _ in lrs] == [0.01, 0.001, 0.001, 0.0001, 0.0001, 0.0001, 0.0001, 0.0001]
    assert [drop for _, drop in lrs] == [False, True, False, True, False, False, False, False]


def test_a_loss_flat_at_ln_c_for_a_whole_epoch_is_not_learning():
    assert flat_loss([math.log(1000) * 1.005, math.log(1000) * 0.996], 1000)
    assert not flat_loss([math.log(1000), math.log(1000) * 0.95], 1000) and not flat_loss([], 1000)


@pytest.fixture
def never_learns(tiny_data, train_cmd, cli, tmp_path) -> subprocess.CompletedProcess:
    """Two epochs of 3 steps at lr 0 from a nearly zero init: every output about equal, the loss about ln(1000)."""
    return cli(*train_cmd(tiny_data, tmp_path / "flat", init="paper", init_std=1e-4, lr=0, width=0.0625,
                          batch_size=12))


@pytest.mark.slow
def test_a_run_that_has_not_started_learning_says_so_loudly_once_per_epoch_after_the_first(never_learns, tmp_path):
    epochs = [r for r in metrics(tmp_path / "flat") if "val_top1_error" in r]
    assert [r.get("not_learning", False) for r in epochs] == [False, True]
    assert said(never_learns).count("has not started learning") == 1
    assert all("lr_held" in r for r in epochs)  # and the plateau rule held its lr at chance level


@pytest.fixture
def small_disk(tmp_path):
    """`mount(size)`: a tmpfs of `size` at tmp_path/disk (root only; skipped with the reason elsewhere), remounted
    with another size on a second call. Always unmounted."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(size: str) -> Path:
        options = f"remount,size={size}" if os.path.ismount(disk) else f"size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'mount failed'})")
        return disk

    try:
        yield mount
    finally:
        if os.path.ismount(disk):
            subprocess.run(["umount", "-l", str(disk)], check=False)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_a_full_disk_in_train_is_one_line_naming_the_path_and_a_rerun_with_space_resumes(
        small_disk, tiny_data, train_cmd, cli, tmp_path):
    run = small_disk("28m") / "run"  # a checkpoint is ~11 MB: steps 1 and 2 fit, step 3 does not
    args = train_cmd(tiny_data, run, max_steps=4, checkpoint_every=1)
    line = one_line_error(cli(*args, check=False), "no space left on the device", str(run / "checkpoints"))
    assert no_temp_files(run) and checkpoints(run) == ["step-000000001.pt", "step-000000002.pt"]
    from pipeline.train.checkpoints import checkpoint_problem

    assert all(checkpoint_problem(p) is None for p in (run / "checkpoints").glob("*.pt")), line
    small_disk("64m")
    resumed = cli(*args)
    assert "resuming from step 2, epoch 0" in said(resumed)
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert checkpoints(run)[-1] == "step-000000004.pt" and (run / "_stage.json").is_file()


@pytest.mark.slow
def test_a_full_disk_in_eval_is_one_line_naming_the_path_and_a_rerun_with_space_completes_naming_the_models_classes(
        small_disk, tiny_data, levelled_checkpoint, cli, tmp_path):
    state = torch.load(levelled_checkpoint, map_location="cpu", weights_only=True)
    spec = RunSpec.of_checkpoint(state)
    assert len(spec.classes.wnids) == len(spec.classes.names) == spec.model.num_classes
    state["config"]["classes"]["names"] = [f"renamed {i}" for i in range(len(spec.classes.names))]  # eval: from here
    checkpoint = tmp_path / levelled_checkpoint.name
    torch.save(state, checkpoint)
    disk = small_disk("1m")
    filler = disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:  # leave the eval not one page
        while True:
            f.write(b"\0" * 4096)
    args = ["eval", checkpoint, "--val", tiny_data["val"], "--out", disk / "eval", "--no-ten-crop"]
    one_line_error(cli(*args, check=False), "no space left on the device", str(disk / "eval"))
    assert no_temp_files(disk) and not (disk / "eval" / "eval.json").exists()
    filler.unlink()
    cli(*args)
    result = json.loads((disk / "eval" / "eval.json").read_text())
    assert result["samples"] == 18 and {c["name"] for c in result["per_class"]} == \
        {f"renamed {c['index']}" for c in result["per_class"]}


@pytest.mark.slow
def test_a_worker_killed_under_torchrun_restarts_and_ends_with_the_weights_of_an_uninterrupted_run(
        tiny_data, tiny_run, train_cmd, tmp_path):
    """What the Slurm train job relies on when a node or a worker is lost: torchrun's elastic restart starts the
    group again and the run resumes from its newest checkpoint, to the uninterrupted run's weights (DALI path)."""
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(TORCHRUN + ["--nproc_per_node=1", "--max-restarts=1", CLI, *train_cmd(tiny_data, run)],
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"},
                                start_new_session=True)
    try:
        wait_for_step(run, proc, log, 5)  # past the checkpoint at step 3
        os.kill(rank_pids(proc)[0], signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "resuming from step" in log.read_text(), log.read_text()
    events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and "resume" in events[1:]
    assert metrics(run) == metrics(tiny_run)
    same_weights(run, tiny_run)
