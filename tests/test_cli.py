"""The CLI as a user meets it: --help everywhere, one clear line (never a traceback) for bad input, status table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import run_cli, run_cli_here


def cli(*args: str, env: dict | None = None):
    """In this process: these tests are of arguments, messages and exit codes."""
    return run_cli_here(*args, check=False, env=env)


def commands() -> list[str]:
    from cli.main import app

    return sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_every_command_is_listed_in_the_top_level_help():
    out = cli("--help")
    assert out.returncode == 0
    for name in commands():
        assert name in out.stdout


@pytest.mark.parametrize("command", commands())
def test_every_command_has_help_that_explains_it(command):
    out = cli(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout and len(out.stdout.splitlines()) > 5


def test_help_is_fast_because_heavy_libraries_load_lazily():
    """Checked by what is imported, not by a clock (a busy machine would make a timed test fail)."""
    probe = subprocess.run([sys.executable, "-c", "import sys, cli.main; print('torch' in sys.modules, "
                            "'nvidia.dali' in sys.modules, 'numpy' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.split() == ["False", "False", "False"]


@pytest.mark.parametrize("args,expected", [
    (["shard", "/nonexistent/imagenet", "OUT", "--split", "train"], "source not found: /nonexistent/imagenet"),
    (["shard", "{tmp}", "{tmp}/out", "--split", "train"], "no ImageNet train split found"),
    (["shard", "{tmp}", "{tmp}/out", "--split", "test"], "--split: expected train or val, got 'test'"),
    (["pca-stats", "{tmp}", "{tmp}/pca"], "no manifest.json"),
    (["verify", "{tmp}"], "no manifest.json"),
    (["shard", "{tmp}", "{tmp}/out", "--split", "train", "--task-index", "1"],
     "--num-tasks: expected both a task index and the number of tasks"),
    (["shard", "{tmp}", "--split", "train"], "--out: expected the output folder (the shards) once"),
    (["pca-stats", "{tmp}", "{tmp}/a", "--out", "{tmp}/b"], "--out: expected the output folder (pca.json) once"),
    (["export", "{tmp}", "--out", "{tmp}/model.xyz"], "model.xyz: expected a file name ending in .pt2 or .onnx"),
])
def test_bad_input_gives_one_clear_line_and_exit_code_2(tmp_path, args, expected):
    out = cli(*[a.format(tmp=tmp_path) for a in args])
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


def test_malformed_labels_file_names_the_file_and_line(tmp_path, sample_dir):
    bad = tmp_path / "LOC_val_solution.csv"
    bad.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,\n")
    out = cli("shard", str(sample_dir / "val"), str(tmp_path / "out"), "--split", "val", "--labels", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(bad) in out.stderr and "line 2" in out.stderr


def test_usage_errors_exit_2_without_a_traceback():
    out = cli("shard", "--shard-size", "zero")
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_debug_shows_the_traceback(tmp_path):
    out = run_cli("--debug", "verify", str(tmp_path), check=False)  # the interpreter prints the traceback: a process
    assert out.returncode != 0 and "Traceback" in out.stderr and "PipeError" in out.stderr


def test_status_reports_missing_partial_and_done_stages(tmp_path, sample_shards):
    work = tmp_path / "work"
    (work / "shards").mkdir(parents=True)
    (work / "shards" / "train").symlink_to(sample_shards["train"], target_is_directory=True)
    out = cli("status", str(work))
    assert out.returncode == 0, out.stderr
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if line.count("│") >= 4}
    assert "done" in rows["shard train"]
    assert "missing" in rows["shard val"] and "missing" in rows["pca-stats"]
    mistyped = cli("status", str(tmp_path / "wrok"))  # or not made yet: every stage missing, and a warning
    assert mistyped.returncode == 0 and mistyped.stderr == (f"warning: {tmp_path / 'wrok'} does not exist yet: "
                                                            "nothing has run there (is WORK right?)\n")
    assert mistyped.stdout.count("│ missing │") == 6
    a_file = cli("status", str(sample_shards["train"] / "manifest.json"))
    assert a_file.returncode == 2 and a_file.stderr.startswith("error: ") and "found a file" in a_file.stderr


@pytest.mark.parametrize("command", [["synth"], ["shard", "SAMPLE", "--split", "train"]], ids=lambda c: c[0])
def test_an_output_folder_under_a_file_is_one_line_naming_the_file(command, sample_dir, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    args = [str(sample_dir) if a == "SAMPLE" else a for a in command]
    out = cli(args[0], *args[1:2], str(blocker / "out"), *args[2:])
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert f"expected a writable folder at {blocker}, found a file" in out.stderr


@pytest.mark.parametrize("width", [60, 100, 200])
def test_help_names_arguments_as_typed_shows_choices_and_wraps_at_any_width(width):
    """Usage lines show OUT (not {out}), flags show no <bool>, the choices of --split, --format and --recipe are
    listed, ablate lists its variants, and no line is wider than the terminal."""
    from cli.options import RECIPES
    from pipeline.experiments.claims import VARIANT_NAMES

    env = {**os.environ, "COLUMNS": str(width), "TERM": "dumb"}
    pages = {c: cli(c, "--help", env=env).stdout for c in ("shard", "synth", "export", "train", "ablate", "status")}
    assert "Usage: alexnet-pipe shard [OPTIONS] SOURCE [OUT]" in " ".join(pages["shard"].split())
    assert "{" not in "".join(line for page in pages.values() for line in page.splitlines() if "Usage:" in line)
    assert all("<bool>" not in page for page in pages.values())
    assert "train|val" in pages["shard"] and "tree|tars" in pages["synth"] and "pt2|onnx" in pages["export"]
    assert RECIPES.startswith("paper|claims|demo|") and RECIPES in pages["train"] and RECIPES in pages["ablate"]
    assert all(name in "".join(pages["ablate"].replace("│", "").split()) for name in VARIANT_NAMES)  # wrapped
    assert all(len(line) <= width for page in pages.values() for line in page.splitlines())


def test_output_folders_are_given_as_out_or_as_the_last_argument(tmp_path):
    """synth, shard and pca-stats take --out like every command; the positional OUT of old still works."""
    by_option, by_position = tmp_path / "a", tmp_path / "b"
    for out in (["--out", str(by_option)], [str(by_position)]):
        assert cli("synth", *out, "--classes", "1", "--train-per-class", "3", "--val-per-class", "3").returncode == 0
    assert sorted(p.name for p in by_option.iterdir()) == sorted(p.name for p in by_position.iterdir())


def test_a_slurm_array_task_id_that_is_no_number_is_one_line(tmp_path):
    out = cli("shard", str(tmp_path), "--out", str(tmp_path / "out"), "--split", "train",
              env={**os.environ, "SLURM_ARRAY_TASK_ID": "abc"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--task-index: expected SLURM_ARRAY_TASK_ID to be a task index (0, 1, …), found 'abc'" in out.stderr
