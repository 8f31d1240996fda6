"""The package as `pip install .` installs it (not the editable checkout): every module and data file is in the
wheel, and the installed CLI runs a stage from a folder that is not the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.mark.slow
def test_a_non_editable_install_holds_every_module_and_data_file_and_runs_a_stage(tmp_path):
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # a copy: no stale build/ of the checkout's is reused
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for top in ("pipeline", "stages", "cli"):
        shutil.copytree(REPO / top, source / top, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(source)], check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("alexnet_pipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {p.relative_to(REPO).as_posix() for top in ("pipeline", "stages", "cli") for p in (REPO / top).rglob("*")
              if p.is_file() and p.suffix in (".py", ".toml", ".txt", ".mk") and "__pycache__" not in p.parts}
    assert wanted - names == set()

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable checkout on sys.path
    here = tmp_path / "elsewhere"
    here.mkdir()

    def installed(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "import sys; from cli.main import main; sys.argv[0] = "
                               "'alexnet-pipe'; main()", *args], capture_output=True, text=True, cwd=here, env=env,
                              timeout=300)

    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], capture_output=True,
                           text=True, cwd=here, env=env, check=True).stdout
    assert where.startswith(str(site)), where
    assert installed("--help").returncode == 0
    synth = installed("synth", "demo", "--classes", "2", "--train-per-class", "2", "--val-per-class", "1")
    assert synth.returncode == 0, synth.stderr
    shard = installed("shard", "demo", "shards", "--split", "train", "--shard-size", "4")
    assert shard.returncode == 0 and (here / "shards" / "manifest.json").is_file(), shard.stderr
    status = installed("status", ".")  # reads the package's layout.mk
    assert status.returncode == 0 and "shard train" in status.stdout, status.stderr
    recipes = subprocess.run([sys.executable, "-c", "from pipeline.config import load_recipe; "
                              "print(load_recipe('demo')['train']['epochs'], load_recipe('tiny')['train']['epochs'])"],
                             capture_output=True, text=True, cwd=here, env=env)
    assert recipes.returncode == 0 and recipes.stdout.split(), recipes.stderr  # the recipes are package data
