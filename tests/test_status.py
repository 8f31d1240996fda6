"""`alexnet-pipe status` finds stages wherever they lie under WORK, lists the default layout's stages before they
start, never lists bookkeeping folders, and shows damaged shards."""

from __future__ import annotations

import shutil

import pytest

from pipeline.status import stage_rows
from stages import versions


def rows(work) -> dict[str, tuple[str, str]]:
    return {f"{name} @ {folder.relative_to(work)}": (state.state, state.detail) for name, folder, state in
            stage_rows(work, versions())}


def test_stages_in_another_layout_are_found_and_bookkeeping_is_never_listed(tiny_data, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny_data["train"], work / "imagenet" / "2012" / "train-shards")
    shutil.copytree(tiny_data["pca"].parent, work / "stats" / "rgb-pca")
    (work / "imagenet" / ".locks").mkdir()
    (work / "notes").mkdir()
    found = rows(work)
    assert found == {
        "synth @ demo-data": ("missing", ""), "shard train @ shards/train": ("missing", ""),
        "shard val @ shards/val": ("missing", ""), "pca-stats @ pca": ("missing", ""),
        "train @ runs": ("missing", ""), "eval @ eval": ("missing", ""),
        "shard train @ imagenet/2012/train-shards": found["shard train @ imagenet/2012/train-shards"],
        "pca-stats @ stats/rgb-pca": found["pca-stats @ stats/rgb-pca"]}
    assert found["shard train @ imagenet/2012/train-shards"][0] == "done"
    assert found["pca-stats @ stats/rgb-pca"][0] == "done"  # its input (the original shards) is unchanged


@pytest.mark.slow
def test_the_cli_shows_a_damaged_shard_set_and_names_verify(tiny_data, cli, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny_data["train"], work / "shards" / "train")
    next((work / "shards" / "train").glob("*.tar")).unlink()
    out = cli("status", work)
    [line] = [line for line in out.stdout.splitlines() if "shard train" in line]
    assert "damaged" in line and "alexnet-pipe verify" in out.stdout
