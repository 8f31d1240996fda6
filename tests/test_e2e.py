"""The whole DAG through the CLI, laid out as the Makefile lays it out, on a tiny generated set: synth → shard
train/val → pca-stats → train → eval → report → status; then a second pass of every command does no work."""

from __future__ import annotations

import pytest

STAGES = ["synth", "shard train", "shard val", "pca-stats", "train demo", "eval demo", "report demo"]


def status_states(cli, work) -> dict[str, str]:
    """stage → state, read from `alexnet-pipe status` (a row may wrap; its first line names the stage)."""
    out = cli("status", work)
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.stdout.splitlines()
            if line.count("│") >= 5]
    return {row[0]: row[2] for row in rows if row[0] and row[0] != "stage"}


@pytest.mark.slow
def test_the_whole_dag_runs_end_to_end_and_a_second_pass_is_up_to_date(cli, tmp_path):
    work = tmp_path / "work"
    data, shards, run, evaluation = work / "demo-data", work / "shards", work / "runs" / "demo", work / "eval" / "demo"
    commands = [
        ("synth", data, "--classes", 4, "--train-per-class", 6, "--val-per-class", 3, "--seed", 0),
        ("shard", data, shards / "train", "--split", "train", "--shard-size", 10),
        ("shard", data, shards / "val", "--split", "val", "--shard-size", 10),
        ("pca-stats", shards / "train", work / "pca"),
        ("train", "--train", shards / "train", "--val", shards / "val", "--pca", work / "pca" / "pca.json", "--out",
         run, "--width", 0.125, "--init", "default", "--lr", 0.003, "--epochs", 2, "--batch-size", 8, "--devices",
         "cpu", "--checkpoint-every", 2, "--log-every", 1),
        ("eval", run, "--val", shards / "val", "--out", evaluation, "--batch-size", 5, "--devices", "cpu"),
        ("report", run, "--eval", evaluation, "--out", evaluation / "report"),
    ]
    assert set(status_states(cli, work).values()) == {"missing"}
    for command in commands:
        out = cli(*command)
        assert "up to date" not in out.stdout + out.stderr, command[0]
    report = evaluation / "report"

    assert status_states(cli, work) == dict.fromkeys(STAGES, "done")
    assert (data / "LOC_val_solution.csv").is_file()
    assert len(list((shards / "train").glob("train-*.tar"))) == 3 and len(list((shards / "val").glob("val-*.tar"))) == 2
    assert (work / "pca" / "pca.json").is_file() and (run / "checkpoints" / "step-000000006.pt").is_file()
    assert (evaluation / "eval.json").is_file() and (report / "report.md").is_file()
    assert sorted(p.name for p in report.glob("*.png")) == ["figure3.png", "images_per_s.png", "loss.png", "lr.png",
                                                              "predictions.png", "val_error.png"]
    text = (report / "report.md").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and ".locks" not in p.parts}
    for command in commands:
        out = cli(*command)
        assert "up to date" in out.stdout + out.stderr, (command[0], out.stdout, out.stderr)
    assert (report / "report.md").read_text() == text
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was rewritten
    assert status_states(cli, work) == dict.fromkeys(STAGES, "done")
