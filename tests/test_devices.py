"""`--devices`: which devices each torchrun rank takes (the GPU count is given, so this runs without GPUs)."""

from __future__ import annotations

import pytest

from pipeline.cluster import resolve_devices
from pipeline.errors import PipeError


def layout(spec: str, ranks: int, gpus: int) -> list[list[str]]:
    return [resolve_devices(spec, r, ranks, cuda_devices=gpus) for r in range(ranks)]


@pytest.mark.parametrize("ranks,gpus,expected", [
    (1, 0, [["cpu"]]),
    (1, 1, [["cuda:0"]]),
    (1, 2, [["cuda:0", "cuda:1"]]),
    (2, 4, [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]),
    (2, 2, [["cuda:0"], ["cuda:1"]]),  # one GPU per rank, not [0,1] for rank 0 and [1] for rank 1
    (4, 4, [["cuda:0"], ["cuda:1"], ["cuda:2"], ["cuda:3"]]),
    (2, 3, [["cuda:0"], ["cuda:1"]]),
    (3, 0, [["cpu"], ["cpu"], ["cpu"]]),
])
def test_auto_gives_every_rank_its_own_gpus_and_all_ranks_the_same_layout(ranks, gpus, expected):
    got = layout("auto", ranks, gpus)
    assert got == expected
    used = [d for devices in got for d in devices if d.startswith("cuda")]
    assert len(used) == len(set(used))  # no GPU shared between ranks (NCCL refuses it)
    assert len({len(devices) for devices in got}) == 1  # DDP needs the same model layout on every rank


def test_more_ranks_than_gpus_is_a_clear_error():
    with pytest.raises(PipeError, match="4 ranks on this node but only 2 GPU"):
        resolve_devices("auto", 0, 4, cuda_devices=2)


def test_an_explicit_gpu_list_is_one_ranks_map_and_refused_for_several_ranks_per_node():
    assert resolve_devices("cuda:0,cuda:1", 0, 1, cuda_devices=2) == ["cuda:0", "cuda:1"]
    assert resolve_devices("cpu,cpu", 1, 2, cuda_devices=0) == ["cpu", "cpu"]
    with pytest.raises(PipeError, match="would all use cuda:0"):
        resolve_devices("cuda:0", 1, 2, cuda_devices=2)
    with pytest.raises(PipeError, match="has 1 CUDA device"):
        resolve_devices("cuda:0,cuda:1", 0, 1, cuda_devices=1)
    with pytest.raises(PipeError, match="one or two devices"):
        resolve_devices("cpu,cpu,cpu")


def test_mixed_device_types_are_refused_before_any_gpu_count_check():
    for spec in ("cpu,cuda:0", "cuda:0,cpu"):
        with pytest.raises(PipeError, match="devices of one type"):
            resolve_devices(spec, cuda_devices=2)
        with pytest.raises(PipeError, match="devices of one type"):
            resolve_devices(spec, cuda_devices=0)


@pytest.mark.slow
def test_train_with_mixed_devices_is_one_line_and_exit_2(tiny_data, train_cmd, cli, tmp_path):
    out = cli(*train_cmd(tiny_data, tmp_path / "run", devices="cpu,cuda:0"), check=False)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "devices of one type" in lines[0], out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
