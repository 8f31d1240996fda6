"""The stage engine against real processes: up-to-date skips, staleness, SIGKILL + rerun, concurrent runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.engine import Input, Stage, atomic_write, file_lock, inspect, task_slice, write_json
from pipeline.errors import PipeError, StageBusy

# A toy stage with slow units, run as a separate process: `toy.py OUT PARAM UNITS DELAY [UPSTREAM]`.
TOY = textwrap.dedent("""
    import hashlib, sys, time
    from dataclasses import dataclass
    from pathlib import Path
    from pipeline.engine import Input, QuietReporter, Stage, StageResult, atomic_write, write_json
    from pipeline.records import Record

    @dataclass(frozen=True)
    class Written(Record):
        bytes: int

    out, param, n_units, delay = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    inputs = {"up": Input.of_stage(Path(sys.argv[5]), "product.json")} if len(sys.argv) > 5 else {}
    stage = Stage("toy", 1, out, {"param": param}, inputs, product="product.json", outputs=("unit-*.bin",))

    def work(unit):
        time.sleep(delay)
        data = hashlib.sha256(f"{param}/{unit}".encode()).digest() * 4096
        with atomic_write(out / f"{unit}.bin") as f:
            f.write(data[: len(data) // 2]); f.flush(); time.sleep(delay / 2); f.write(data[len(data) // 2 :])
        return Written(len(data))

    def body():
        stage.run_units(units, work, on_done=lambda u, r: print("done", u, flush=True))
        total = sum(r["bytes"] for r in stage.records(units).values())
        stage.finalize(lambda: write_json(out / "product.json", {"param": param, "total": total}))
        return StageResult("toy", out, finished=True)

    units = [f"unit-{i:03d}" for i in range(n_units)]
    result = stage.execute(body, say=QuietReporter(), units=units)
    print("up to date" if result.up_to_date else "finished")
""")


@pytest.fixture()
def toy(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(TOY)

    def start(out: Path, param: str = "a", units: int = 6, delay: float = 0.0, upstream: Path | None = None):
        args = [sys.executable, str(script), str(out), param, str(units), str(delay)]
        if upstream is not None:
            args.append(str(upstream))
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})

    def run(*args, **kw) -> str:
        p = start(*args, **kw)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        return out

    return start, run


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Content and mtime of every file except locks (whose holder info changes)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and ".locks" not in p.parts}


def test_finished_stage_is_skipped_and_untouched(toy, tmp_path):
    _, run = toy
    out = tmp_path / "a"
    assert "finished" in run(out)
    before = snapshot(out)
    assert run(out).strip() == "up to date"
    assert snapshot(out) == before
    assert inspect(out).state == "done"


def test_param_change_reruns_the_stage_and_says_why(toy, tmp_path):
    _, run = toy
    out = tmp_path / "a"
    run(out, param="a")
    stage = Stage("toy", 1, out, {"param": "b"}, product="product.json")
    assert not stage.up_to_date()
    assert stage.stale_reason() == 'params changed: param "a" → "b"'
    assert "finished" in run(out, param="b")
    assert '"param": "b"' in (out / "product.json").read_text()


def test_upstream_change_makes_downstream_stale(toy, tmp_path):
    _, run = toy
    up, down = tmp_path / "up", tmp_path / "down"
    run(up, param="a")
    run(down, param="x", upstream=up)
    assert inspect(down).state == "done"
    run(up, param="b")  # the upstream product changes
    state = inspect(down)
    assert state.state == "stale" and "input up changed" in state.detail
    assert "finished" in run(down, param="x", upstream=up)
    assert inspect(down).state == "done"


@pytest.mark.slow
def test_sigkill_mid_units_then_rerun_keeps_finished_units_and_is_byte_identical(toy, tmp_path):
    start, run = toy
    reference = tmp_path / "reference"
    run(reference, units=8)

    out = tmp_path / "killed"
    proc = start(out, units=8, delay=0.3)
    seen = []
    for line in proc.stdout:  # kill once three units are finished, while the fourth is being written
        if line.startswith("done"):
            seen.append(line.split()[1])
        if len(seen) == 3:
            time.sleep(0.4)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    assert inspect(out).state == "partial" and inspect(out).detail == "3 of 8 units"
    assert not (out / "product.json").exists()
    assert not any((out / f"unit-{i:03d}.bin").exists() for i in range(4, 8))
    kept = {u: (out / f"{u}.bin").stat().st_mtime_ns for u in seen}

    rerun = run(out, units=8)
    assert [line.split()[1] for line in rerun.splitlines() if line.startswith("done")] == [
        f"unit-{i:03d}" for i in range(3, 8)]
    assert {u: (out / f"{u}.bin").stat().st_mtime_ns for u in seen} == kept
    ref = {k: v[0] for k, v in snapshot(reference).items() if k != "_stage.json"}
    got = {k: v[0] for k, v in snapshot(out).items() if k != "_stage.json"}
    assert got == ref  # every unit, record, plan and product identical; no temp file left behind


@pytest.mark.slow
def test_two_concurrent_runs_one_refuses_and_nothing_is_corrupt(toy, tmp_path):
    start, run = toy
    out = tmp_path / "a"
    first = start(out, units=4, delay=0.3)
    while not (out / "_plan.json").exists():
        time.sleep(0.05)
    second = start(out, units=4)
    _, err = second.communicate(timeout=30)
    assert second.returncode != 0 and "StageBusy" in err and "already running" in err
    first.communicate(timeout=60)
    assert first.returncode == 0
    reference = tmp_path / "reference"
    run(reference, units=4)
    assert {k: v[0] for k, v in snapshot(out).items() if k != "_stage.json"} == {
        k: v[0] for k, v in snapshot(reference).items() if k != "_stage.json"}


def test_run_lock_refuses_a_second_holder_in_process(tmp_path):
    stage = Stage("toy", 1, tmp_path, {})
    with stage.run_lock(exclusive=True):
        other = Stage("toy", 1, tmp_path, {})
        with pytest.raises(StageBusy, match="already running"):
            with other.run_lock(exclusive=True):
                pass
        with other.run_lock(exclusive=False):  # array tasks share the folder
            pass


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n "a": 1\n}\n'


def test_an_output_under_a_file_or_on_a_read_only_disk_is_one_line_naming_what_is_in_the_way(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    expected = f"expected a writable folder at {blocker}, found a file; choose another output path"
    with pytest.raises(PipeError, match=expected):
        write_json(blocker / "sub" / "x.json", {"a": 1})
    with pytest.raises(PipeError, match=expected):
        with file_lock(blocker / ".locks" / "run", blocking=False):
            pass
    with pytest.raises(PipeError, match=expected):
        Stage("toy", 1, blocker / "out", {}).plan(["a"])
    assert list(tmp_path.iterdir()) == [blocker] and blocker.read_text() == "not a folder"

    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(read_only)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a read-only disk needs root to mount a tmpfs")
    try:
        with pytest.raises(PipeError, match=f"expected a writable folder at {read_only}, found read-only file system"):
            write_json(read_only / "x.json", {"a": 1})
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


def test_key_ignores_nothing_but_what_it_is_not_given(tmp_path):
    a = Stage("s", 1, tmp_path, {"p": 1}, {"i": Input(tmp_path, "d1")})
    assert a.key == Stage("s", 1, tmp_path / "elsewhere", {"p": 1}, {"i": Input(tmp_path / "x", "d1")}).key
    assert a.key != Stage("s", 2, tmp_path, {"p": 1}, {"i": Input(tmp_path, "d1")}).key
    assert a.key != Stage("s", 1, tmp_path, {"p": 2}, {"i": Input(tmp_path, "d1")}).key
    assert a.key != Stage("s", 1, tmp_path, {"p": 1}, {"i": Input(tmp_path, "d2")}).key


@pytest.mark.parametrize("units,tasks", [(10, 3), (3, 5), (1282, 64), (7, 1)])
def test_task_slices_partition_the_units(units, tasks):
    owned = [list(task_slice(units, i, tasks)) for i in range(tasks)]
    assert sum(owned, []) == list(range(units))
    assert max(map(len, owned)) - min(map(len, owned)) <= 1


# A job that counts, in the parent (where all pickling happens), how often it is pickled: `counted.py OUT UNITS`.
COUNTED = textwrap.dedent("""
    import sys
    from dataclasses import dataclass
    from pathlib import Path
    from pipeline.engine import Stage
    from pipeline.records import Record

    @dataclass(frozen=True)
    class Done(Record):
        unit: str

    class CountedJob:
        pickled = 0

        def __getstate__(self):
            CountedJob.pickled += 1
            return {}

        def __call__(self, unit):
            return Done(unit)

    if __name__ == "__main__":
        stage = Stage("counted", 1, Path(sys.argv[1]), {})
        units = [f"unit-{i:03d}" for i in range(int(sys.argv[2]))]
        stage.run_units(units, CountedJob(), workers=2)
        assert [r["unit"] for r in stage.records(units).values()] == units
        print(CountedJob.pickled)
""")


def test_workers_get_the_job_once_not_with_every_unit(tmp_path):
    """What is sent per unit must not grow with the stage: a job holding something for each of n units, pickled
    with every one of the n tasks, costs n² (pca-stats' keep lists over 1,282 shards)."""
    script = tmp_path / "counted.py"
    script.write_text(COUNTED)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "12"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 2  # once for each of the two workers, for 12 units
