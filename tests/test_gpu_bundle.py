"""tools/gpu-bundle.sh, the half that runs anywhere: split files into parts with sums, collect the parts that
separate runs bring into one store, check and reassemble them; a missing or corrupt part is one line, exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu-bundle.sh"
PART = 100_000  # bytes, instead of 56 MiB


def bundle(*args, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PART_SIZE": str(PART)})
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture
def wheels(tmp_path) -> Path:
    """Three files the size of small wheels (random bytes: incompressible, like a wheel)."""
    src = tmp_path / "wheels"
    src.mkdir()
    for name, size in (("a-1.0-py3-none-any.whl", 150_000), ("b-2.0-py3-none-any.whl", 90_000), ("c.whl", 7)):
        (src / name).write_bytes(os.urandom(size))
    return src


def split_into_runs(wheels: Path, tmp_path: Path) -> list[Path]:
    """The parts as separate runs carry them: each run's folder holds SHA256SUMS and one part."""
    made = tmp_path / "gpu-bundle"
    bundle("split", wheels, made)
    runs = []
    for part in sorted(made.glob("part-*")):
        run = tmp_path / f"run-{part.name}" / "gpu-bundle"
        run.mkdir(parents=True)
        shutil.copy(made / "SHA256SUMS", run)
        shutil.copy(part, run)
        runs.append(run)
    return runs


def error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    return lines[0]


def test_parts_carried_by_separate_runs_reassemble_into_the_same_files(wheels, tmp_path):
    runs = split_into_runs(wheels, tmp_path)
    sums = (runs[0] / "SHA256SUMS").read_text().splitlines()
    assert len(runs) == len(sums) >= 3  # 240 kB of files in parts of 100 kB
    assert all(part.stat().st_size <= PART for run in runs for part in run.glob("part-*"))
    store = tmp_path / "store"
    said = [bundle("collect", run, store).stdout for run in runs]
    assert f"holds 1 of {len(runs)} parts" in said[0] and "still to bring: part-001" in said[0]
    assert f"holds {len(runs)} of {len(runs)} parts" in said[-1] and "still to bring: none" in said[-1]
    bundle("assemble", store, tmp_path / "out")
    got = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert got == {p.name: p.read_bytes() for p in wheels.iterdir()}


def test_a_missing_part_is_one_line_naming_it(wheels, tmp_path):
    runs = split_into_runs(wheels, tmp_path)
    store = tmp_path / "store"
    for run in runs[:1] + runs[2:]:  # the run carrying part-001 never happened
        bundle("collect", run, store)
    line = error_line(bundle("assemble", store, tmp_path / "out", check=False))
    assert "part-001 is missing" in line and str(store) in line
    assert not (tmp_path / "out").exists()


def test_a_corrupt_part_is_one_line_naming_it_and_nothing_is_unpacked(wheels, tmp_path):
    runs = split_into_runs(wheels, tmp_path)
    store = tmp_path / "store"
    for run in runs:
        bundle("collect", run, store)
    part = store / "part-002"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    line = error_line(bundle("assemble", store, tmp_path / "out", check=False))
    assert f"{part} is corrupt" in line and "expected" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_collect_without_the_sums_and_split_of_nothing_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "SHA256SUMS" in error_line(bundle("collect", tmp_path / "empty", tmp_path / "store", check=False))
    assert "found none" in error_line(bundle("split", tmp_path / "empty", tmp_path / "b", check=False))
