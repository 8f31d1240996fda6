"""DDP on the CPU (gloo): 2 ranks each taking half of the same global batch follow the 1-rank loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from pipeline.model import AlexNetConfig, build_model
    from pipeline.config import TrainConfig
    from pipeline.train.loop import train_step
    from pipeline.train.schedule import make_optimizer

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    devices = sys.argv[2].split(",")
    torch.manual_seed(0)
    model = build_model(AlexNetConfig(num_classes=10, width=0.25, dropout=0.0), devices)
    net = model
    if world > 1:
        # A file store, not a TCP port: no port to collide with whatever else runs on the machine.
        dist.init_process_group("gloo", init_method=f"file://{sys.argv[3]}", rank=rank, world_size=world)
        net = DistributedDataParallel(model)
    optimizer = make_optimizer(model, TrainConfig(lr=0.01))
    data = torch.Generator().manual_seed(1)
    losses, B = [], 8
    images = torch.randn(B, 3, 224, 224, generator=data)  # one fixed global batch, fitted for a few steps
    labels = torch.randint(0, 10, (B,), generator=data)
    for step in range(4):
        rows = slice(rank * B // world, (rank + 1) * B // world)  # rank r takes rows [rB/W, (r+1)B/W)
        loss, _ = train_step(net, optimizer, images[rows], labels[rows])
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(losses, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    # gloo's threads can abort the interpreter's own teardown ("terminate called without an active exception"):
    # everything this worker shows is written, so leave without it
    os._exit(0)
""")


def run_ranks(tmp_path: Path, world: int, devices: str) -> list[float]:
    script, out = tmp_path / "worker.py", tmp_path / f"losses-{world}-{devices}.json"
    script.write_text(WORKER)
    store = tmp_path / f"store-{world}-{devices}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(out), devices, str(store)], env={**env, "RANK": str(r),
                                                                                      "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_gloo_ranks_follow_the_single_rank_loss_curve(tmp_path):
    single = run_ranks(tmp_path, 1, "cpu")
    double = run_ranks(tmp_path, 2, "cpu")
    assert single[-1] < single[0]  # it learns the fixed batch
    assert max(abs(a - b) for a, b in zip(single, double)) < 1e-4, (single, double)


@pytest.mark.slow
def test_two_tower_placement_on_two_devices_trains_identically(tmp_path):
    assert run_ranks(tmp_path, 1, "cpu,cpu") == pytest.approx(run_ranks(tmp_path, 1, "cpu"), abs=1e-6)


@pytest.mark.slow
def test_alexnet_pipe_torchrun_ends_a_stop_signal_with_one_line_and_the_signals_status(tmp_path):
    """What the Slurm train job runs: torchrun's arguments, and on SIGTERM (after the ranks got it) one line and exit
    143 where torchrun prints a SignalException traceback."""
    import contextlib
    import signal
    import time

    launcher = Path(sys.executable).with_name("alexnet-pipe-torchrun")
    proc = subprocess.Popen([str(launcher), "--standalone", "--nproc_per_node=1", "--no-python", "sleep", "60"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        def rank_started() -> bool:  # the rank itself (`sleep`), not a helper process torchrun starts before it
            for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"sleep\0"):
                        return True
            return False

        while not rank_started():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "torchrun: stopped by SIGTERM; the ranks were passed the signal and " \
                                             "have exited"
