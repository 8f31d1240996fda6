"""The Slurm batch scripts (cluster/slurm/) and cluster/submit.sh on a real single-node cluster started by
tests/slurm_cluster.sh: the job arrays give the single-process bytes, a cancelled task resubmitted alone completes
the set, a task requeued mid-run keeps what it wrote, and training runs as 2 ranks through srun + torchrun, then
eval. Each job asks for 1–2 CPUs (CI has 2 cores); the module takes about a minute."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.records import RunSpec

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("slurmctld") is None,
                       reason="Slurm is not installed (slurmctld not on PATH): run .ci/install-slurm.sh as root"),
]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm_cluster.sh"
SUBMIT = REPO / "cluster" / "submit.sh"
SHARD_SBATCH = REPO / "cluster" / "slurm" / "shard.sbatch"
CLI = Path(sys.executable).parent / "alexnet-pipe"  # the venv running the tests; no resolve(): keep the venv's bin/
SHARD_SIZE = 32  # train: 210 images → 7 shards, val: 50 → 2; 3 tasks own [0,2) [2,4) [4,7) and [0,0) [0,1) [1,2)
TASKS = 3
UNTRAINED = "--untrained-val-classes"  # the samples' val images are of classes their train images lack
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A running cluster; its value is the environment jobs are submitted with (sbatch exports it to them)."""
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        pytest.fail(f"tests/slurm_cluster.sh start failed:\n{started.stdout}{started.stderr}")
    outer = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")  # when the tests themselves run inside a Slurm job
    env = {k: v for k, v in os.environ.items() if not k.startswith(outer)}
    env.update(SLURM_CONF=started.stdout.strip().splitlines()[-1], ALEXNET_PIPE=str(CLI), OMP_NUM_THREADS="1",
               CPUS_PER_TASK="1", SHARD_SIZE=str(SHARD_SIZE), NUM_TASKS=str(TASKS))
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop", str(state)], capture_output=True, timeout=120)


def submit(env: dict[str, str], *stages: str, **settings: str) -> dict[str, str]:
    """cluster/submit.sh STAGE…: its "NAME JOBID" lines as {name: id}."""
    out = subprocess.run([str(SUBMIT), *stages], env={**env, **settings}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(line.split() for line in out.stdout.splitlines())


def sbatch(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def scontrol(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def job_states(env: dict[str, str], job: str) -> dict[str, str]:
    """{"ID" or "ID_TASK": JobState} from `scontrol show job -o` (there is no sacct without accounting)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=60)
    states = {}
    for line in out.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        task = fields.get("ArrayTaskId")
        states[f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"]] = fields["JobState"]
    return states


def wait(env: dict[str, str], *jobs: str, timeout: float = 240) -> dict[str, str]:
    """Poll until every task of `jobs` has ended; their final states."""
    deadline = time.monotonic() + timeout
    while True:
        states = {k: v for job in jobs for k, v in job_states(env, job).items()}
        if states and all(s in ENDED for s in states.values()):
            return states
        if time.monotonic() > deadline:
            pytest.fail(f"jobs still not ended after {timeout} s: {states}\n{squeue(env)}")
        time.sleep(0.5)


def squeue(env: dict[str, str]) -> str:
    return subprocess.run(["squeue"], env=env, capture_output=True, text=True, timeout=60).stdout


def logs(work: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((work / "logs").glob("*.out")))


def digests(folder: Path) -> dict[str, str]:
    """sha256 of the products a run must reproduce byte for byte (shards, DALI indexes, manifest, pca.json)."""
    files = [p for pattern in ("*.tar", "*.idx", "manifest.json", "pca.json") for p in folder.glob(pattern)]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, sample_tree) -> Path:
    """The same stages run in this process with one worker: the bytes every cluster run must match."""
    from stages import pca, shard

    out = tmp_path_factory.mktemp("single-process")
    for split in ("train", "val"):
        shard.run(sample_tree, out / "shards" / split, split=split, shard_size=SHARD_SIZE, workers=1)
    pca.run(out / "shards" / "train", out / "pca", workers=1)
    return out


@pytest.fixture(scope="module")
def prepared(slurm, sample_tree, tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """`cluster/submit.sh prepare` (shard train + val arrays and finalize jobs, pca-stats array and reduce), run to
    the end: the work folder, the job ids by name and every job's final state."""
    work = tmp_path_factory.mktemp("work")
    jobs = submit(slurm, "prepare", DATA=str(sample_tree), WORK=str(work))
    return work, jobs, wait(slurm, *jobs.values())


@pytest.mark.slow
def test_prepare_submits_arrays_then_finalize_jobs_chained_afterok(prepared):
    work, jobs, states = prepared
    assert list(jobs) == ["shard-train", "shard-train-finalize", "shard-val", "shard-val-finalize", "pca-stats",
                          "pca-stats-reduce"]
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs(work)}"
    for name in ("shard-train", "shard-val", "pca-stats"):
        assert {f"{jobs[name]}_{i}" for i in range(TASKS)} <= set(states), f"{name} is not a {TASKS}-task array"
        for i in range(TASKS):  # one log per task, named %x-%A_%a.out
            assert (work / "logs" / f"{name}-{jobs[name]}_{i}.out").is_file()
    assert (work / "logs" / "jobs" / "pca-stats").read_text().strip() == jobs["pca-stats-reduce"]


@pytest.mark.slow
def test_shard_and_pca_arrays_give_the_single_process_bytes(prepared, single_process):
    work, _, _ = prepared
    for folder in ("shards/train", "shards/val", "pca"):
        expected = digests(single_process / folder)
        assert expected, folder
        assert digests(work / folder) == expected, f"{folder} differs from the single-process run\n{logs(work)}"


@pytest.mark.slow
def test_cancelled_array_task_resubmitted_alone_completes_the_set(slurm, sample_tree, single_process, tmp_path):
    out = tmp_path / "shards" / "train"
    options = [str(sample_tree), str(out), "--split", "train", "--shard-size", str(SHARD_SIZE)]
    logs_to = ["--cpus-per-task=1", "--output", str(tmp_path / "%x-%A_%a.out")]
    array = sbatch(slurm, "--hold", f"--array=0-{TASKS - 1}", *logs_to, str(SHARD_SBATCH), *options,
                   "--num-tasks", str(TASKS))
    finalize = sbatch(slurm, f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes", *logs_to,
                      str(SHARD_SBATCH), *options)
    subprocess.run(["scancel", f"{array}_1"], env=slurm, check=True, timeout=60)  # before it starts: its shards
    scontrol(slurm, "release", array)  # 2 and 3 are never written
    states = wait(slurm, array, finalize)
    assert states[f"{array}_0"] == states[f"{array}_2"] == "COMPLETED"
    assert states.get(f"{array}_1", "CANCELLED") == "CANCELLED"  # a pending task cancelled leaves no record
    assert states[finalize] == "CANCELLED"  # afterok can never be met: --kill-on-invalid-dep removes it
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-{i:06d}.tar" for i in (0, 1, 4, 5, 6)]
    assert not (out / "manifest.json").exists()

    # The one index alone, with the same --num-tasks (SLURM_ARRAY_TASK_COUNT is 1 now), then a new finalize job.
    work = tmp_path  # submit.sh derives shards/train from WORK
    again = submit(slurm, "shard-train", DATA=str(sample_tree), WORK=str(work), ARRAY="1",
                   SHARD_TRAIN_TASKS=str(TASKS))
    states = wait(slurm, *again.values())
    assert states == {f"{again['shard-train']}_1": "COMPLETED", again["shard-train-finalize"]: "COMPLETED"}, \
        logs(work)
    assert digests(out) == digests(single_process / "shards" / "train")


@pytest.mark.slow
def test_requeued_running_task_resumes_and_keeps_what_it_wrote(slurm, sample_tree, single_process, tmp_path):
    out = tmp_path / "shards" / "train"
    array = sbatch(slurm, "--array=0", "--cpus-per-task=1", "--output", str(tmp_path / "%x-%A_%a.out"),
                   str(SHARD_SBATCH), str(sample_tree), str(out), "--split", "train", "--shard-size", str(SHARD_SIZE),
                   "--num-tasks", "1")  # one task writes all 7 shards, one after the other
    deadline = time.monotonic() + 120
    while not list((out / "_units").glob("train-*.json")):  # the first shard is done, the other six are not
        assert time.monotonic() < deadline, squeue(slurm)
        time.sleep(0.05)
    scontrol(slurm, "requeue", f"{array}_0")  # as on preemption or node failure: killed, queued again, rerun
    states = wait(slurm, array)
    assert states == {f"{array}_0": "COMPLETED"}
    assert "Restarts=1 " in scontrol(slurm, "show", "job", "-o", array)
    log = (tmp_path / f"shard-{array}_0.out").read_text()  # --open-mode=append: both runs in one log
    assert "DUE TO JOB REQUEUE" in log and "(restart 0)" in log and "(restart 1)" in log, log
    assert digests(out) == digests(single_process / "shards" / "train")


@pytest.mark.slow
def test_two_rank_training_through_srun_and_torchrun_then_eval(slurm, prepared):
    work, _, _ = prepared
    jobs = submit(slurm, "train", "eval", WORK=str(work), RUN="slurm", NODES="1", GPUS_PER_NODE="0",
                  NPROC_PER_NODE="2", TRAIN_CPUS="2", DEVICES="cpu", RDZV_PORT=str(free_port()),
                  TRAIN_ARGS=f"--max-steps 2 --batch-size 8 --width 0.25 --loader torch --loader-threads 1 "
                             f"--checkpoint-every 2 {UNTRAINED}",
                  EVAL_ARGS=f"--loader torch --batch-size 25 {UNTRAINED}")
    assert list(jobs) == ["train", "eval"]
    states = wait(slurm, *jobs.values(), timeout=300)
    assert states == {jobs["train"]: "COMPLETED", jobs["eval"]: "COMPLETED"}, logs(work)
    checkpoints = sorted((work / "runs" / "slurm" / "checkpoints").glob("*.pt"))
    assert [p.name for p in checkpoints] == ["step-000000002.pt"]
    import torch

    checkpoint = torch.load(checkpoints[0], weights_only=True)
    assert checkpoint["step"] == 2 and RunSpec.of_checkpoint(checkpoint).topology.world_size == 2  # 2 DDP ranks
    assert (work / "eval" / "slurm" / "eval.json").is_file()


@pytest.mark.slow
def test_a_train_job_signalled_usr1_checkpoints_requeues_itself_and_completes_with_no_step_lost(slurm, prepared):
    """What a time limit's warning (--signal=B:USR1@…) or a preemption does, sent at once with scancel."""
    work, _, _ = prepared
    jobs = submit(slurm, "train", WORK=str(work), RUN="preempted", NODES="1", GPUS_PER_NODE="0",
                  NPROC_PER_NODE="1", TRAIN_CPUS="1", DEVICES="cpu", RDZV_PORT=str(free_port()),
                  TRAIN_ARGS=f"--max-steps 30 --batch-size 8 --width 0.25 --loader torch --loader-threads 1 "
                             f"--log-every 1 --checkpoint-every 1000 {UNTRAINED}")
    job, metrics = jobs["train"], work / "runs" / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:  # training, not yet at step 30
        assert time.monotonic() < deadline, f"no training after 180 s\n{squeue(slurm)}\n{logs(work)}"
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True, timeout=60)
    states = wait(slurm, job, timeout=300)
    log = logs(work)
    assert "Traceback" not in log and "torchrun: stopped by SIGTERM; the ranks were passed the signal" in log, log
    assert states == {job: "COMPLETED"}, log
    assert "Restarts=1 " in scontrol(slurm, "show", "job", "-o", job), log
    import re

    stopped = re.search(r"train: stopped at step (\d+) \(SIGTERM\), rerun to resume", log)
    assert stopped and 3 <= int(stopped[1]) < 30, log
    assert f"train: resuming from step {stopped[1]}, epoch 0" in log and "requeueing job" in log, log
    import json

    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 31))  # each step once: none lost or redone
    assert sorted(p.name for p in (metrics.parent / "checkpoints").glob("*.pt"))[-1] == "step-000000030.pt"


@pytest.mark.slow
def test_ablations_run_as_an_array_a_task_signalled_usr1_requeues_and_the_last_task_writes_the_table(slurm,
                                                                                                    prepared):
    """`cluster/submit.sh ablations`: two array tasks share the sweep's runs (one each) on the prepared shards; task 0
    is sent USR1 mid-run (a time limit's warning), stops its run at a checkpoint, requeues itself and resumes it."""
    work, _, _ = prepared
    jobs = submit(slurm, "ablations", WORK=str(work), ABLATION_TASKS="2", TRAIN_CPUS="1", GPUS_PER_NODE="0",
                  DEVICES="cpu",
                  ABLATION_ARGS="--variants baseline,tanh --seeds 1 --width 0.125 --epochs 2 --max-steps 30 "
                                "--batch-size 8 --loader torch --loader-threads 1 --no-ten-crop --threshold 0.9 "
                                f"--log-every 1 --checkpoint-every 1000 {UNTRAINED}")
    array = jobs["ablations"]
    metrics = work / "ablations" / "runs" / "baseline-seed0" / "metrics.jsonl"  # task 0's run
    deadline = time.monotonic() + 180
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline, f"no training after 180 s\n{squeue(slurm)}\n{logs(work)}"
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{array}_0"], env=slurm, check=True, timeout=60)
    states = wait(slurm, array, timeout=300)
    assert states == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}, logs(work)
    task_logs = [(work / "logs" / f"ablations-{array}_{i}.out").read_text() for i in (0, 1)]
    assert "Restarts=1 " in scontrol(slurm, "show", "job", "-o", f"{array}_0"), task_logs[0]
    assert "(SIGTERM), rerun to resume" in task_logs[0] and "train: resuming from step" in task_logs[0], task_logs[0]
    assert "requeueing job" in task_logs[0] and "Traceback" not in task_logs[0], task_logs[0]
    import json

    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 31))  # each step once: none lost or redone
    table = json.loads((work / "ablations" / "ablations.json").read_text())
    for record in table["runs"]:  # one run per task, each its own cached train run and eval
        result = json.loads((work / "ablations" / "eval" / f"{record['variant']}-seed0" / "eval.json").read_text())
        assert record["top1_error"] == result["centre"]["top1_error"] and record["test"] == "centre"
    assert sorted(r["variant"] for r in table["runs"]) == ["baseline", "tanh"]
    assert sum(text.count("ablate: 2 runs →") for text in task_logs) == 1, task_logs  # the table, written once
