"""Evaluation: top-k errors computed by hand, 10-crop averaging and batch-size invariance; then the eval stage through
the CLI on a real short run's checkpoint, against top-1/top-5 errors computed here from the model and the torch
reference path (10-crop: the ten views evaluated separately, softmaxes averaged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.augment import ReferenceEvalLoader, make_eval_loader, reference_eval_samples
from pipeline.evaluate import class_probabilities, confused_pairs, errors, per_class_accuracy, view_probabilities
from pipeline.model import build_model
from pipeline.records import Pca, RunSpec


class LookupModel(torch.nn.Module):
    """Returns hand-made logits: image i (a constant image of value i) → row i of the table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.flatten(1)[:, 0].round().long()]


def batches(n: int, labels: list[int], batch_size: int, views: int = 0):
    for start in range(0, n, batch_size):
        ids = torch.arange(start, min(n, start + batch_size), dtype=torch.float32)
        images = ids[:, None, None, None].expand(-1, 3, 4, 4).clone()
        if views:
            images = images[:, None].expand(-1, views, -1, -1, -1).clone()
        yield images, torch.tensor(labels[start:start + batch_size])


def test_hand_made_logits_give_the_hand_computed_top1_and_top5_error():
    # 6 classes, 4 samples; the label's rank among the logits is 1, 2, 6 and 5 → top-1 hits 1/4, top-5 hits 3/4
    table = torch.tensor([[9.0, 1, 2, 3, 4, 5],   # label 0: rank 1
                          [1.0, 8, 9, 3, 4, 5],   # label 1: rank 2
                          [6.0, 5, 0, 3, 4, 2],   # label 2: rank 6 (lowest)
                          [6.0, 5, 4, 2, 3, 1]])  # label 3: rank 5
    labels = [0, 1, 2, 3]
    probs, got = class_probabilities(LookupModel(table), batches(4, labels, 3))
    result = errors(probs, got)
    assert (result.top1_error, result.top5_error, result.samples) == (0.75, 0.25, 4)
    assert per_class_accuracy(probs, got) == {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0}
    assert confused_pairs(probs, got)[0][2] == 1
    assert {(true, predicted) for true, predicted, _ in confused_pairs(probs, got)} == {(1, 2), (2, 0), (3, 0)}


def test_ten_crop_equals_the_mean_of_ten_separate_softmaxes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 7))
    views = torch.randn(5, 10, 3, 8, 8)
    averaged = view_probabilities(model, views)
    separate = torch.stack([torch.softmax(model(views[:, v]), dim=1) for v in range(10)]).mean(dim=0)
    assert torch.allclose(averaged, separate, atol=1e-7)
    assert not torch.allclose(averaged, torch.softmax(model(views[:, 0]), dim=1))


def test_batch_size_does_not_change_the_result():
    torch.manual_seed(0)
    table = torch.randn(37, 1000)
    labels = torch.randint(0, 1000, (37,)).tolist()
    reference = class_probabilities(LookupModel(table), batches(37, labels, 37))
    for batch_size in (1, 5, 8, 36, 64):
        probs, got = class_probabilities(LookupModel(table), batches(37, labels, batch_size))
        assert torch.equal(got, reference[1]) and torch.allclose(probs, reference[0], atol=1e-7)
        assert errors(probs, got) == errors(*reference)
    ten = class_probabilities(LookupModel(table), batches(37, labels, 8, views=10))  # 10 identical views → same as one
    assert torch.allclose(ten[0], reference[0], atol=1e-6)


def test_predict_restores_training_mode():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(48, 3)).train()
    class_probabilities(model, batches(4, [0, 1, 2, 0], 2))
    assert model.training


THROUGHPUT = "images_per_s"


def eval_json(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def without_throughput(result: dict) -> dict:
    """eval.json less what depends on the machine's speed, on where the files are and on the command line."""
    drop = {THROUGHPUT}
    return {k: ({kk: vv for kk, vv in v.items() if kk not in drop} if isinstance(v, dict) else v)
            for k, v in result.items() if k not in ("checkpoint", "val", "run_record")}


def errors_of(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    top5 = probs.topk(5, dim=1).indices
    top1_hits = [int(top5[i, 0]) == int(labels[i]) for i in range(len(labels))]
    top5_hits = [int(labels[i]) in top5[i].tolist() for i in range(len(labels))]
    return {"top1_error": 1 - sum(top1_hits) / len(labels), "top5_error": 1 - sum(top5_hits) / len(labels)}


@pytest.fixture(scope="module")
def checkpoint(levelled_checkpoint) -> Path:
    return levelled_checkpoint


@pytest.fixture(scope="module")
def model(checkpoint) -> torch.nn.Module:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net = build_model(RunSpec.of_checkpoint(state).model, ["cpu"])
    net.load_state_dict(state["model"])
    return net.eval()


@pytest.fixture(scope="module")
def expected(model, tiny_data) -> dict:
    """Probabilities computed here: centre crop one image at a time, 10-crop one view at a time."""
    pca = Pca.read(tiny_data["pca"])
    keys, centre, labels = [], [], []
    with torch.no_grad():
        for key, image, label in reference_eval_samples(tiny_data["val"], pca, crop=224):
            keys.append(key)
            centre.append(torch.softmax(model(image[None]), dim=1)[0])
            labels.append(label)
        ten = []
        for views, _ in ReferenceEvalLoader(tiny_data["val"], pca, 5, crop=224, ten_crop=True, num_threads=0):
            assert views.shape[1:] == (10, 3, 224, 224)
            ten.append(torch.stack([torch.softmax(model(views[:, v]), dim=1) for v in range(10)]).mean(dim=0))
    return {"keys": keys, "labels": torch.tensor(labels), "centre": torch.stack(centre), "ten_crop": torch.cat(ten)}


@pytest.fixture(scope="module")
def evaluated(tiny_data, checkpoint, cli, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "bs7"
    cli("eval", checkpoint, "--val", tiny_data["val"], "--out", out, "--batch-size", 7, "--devices", "cpu")
    return out


@pytest.mark.slow
def test_eval_json_errors_equal_those_computed_from_the_model_and_the_reference_path(evaluated, expected,
                                                                                      checkpoint):
    result = eval_json(evaluated)
    labels = expected["labels"]
    assert result["samples"] == len(labels) == 18
    assert result["checkpoint"]["path"] == str(checkpoint)
    assert not torch.allclose(expected["centre"], expected["ten_crop"], atol=1e-4)  # the ten views matter
    for view in ("centre", "ten_crop"):
        want = errors_of(expected[view], labels)
        assert result[view]["top1_error"] == pytest.approx(want["top1_error"], abs=1e-12), view
        assert result[view]["top5_error"] == pytest.approx(want["top5_error"], abs=1e-12), view
        assert result[view]["samples"] == len(labels)
    assert 0 < result["centre"]["top5_error"] < result["centre"]["top1_error"] < 1  # not a degenerate model
    assert {k: result["centre"][k] for k in want} != {k: result["ten_crop"][k] for k in want}
    predicted = expected["centre"].argmax(dim=1)
    for row in result["per_class"]:
        mine = labels == row["index"]
        assert row["samples"] == int(mine.sum())
        assert row["top1_accuracy"] == pytest.approx((predicted[mine] == row["index"]).float().mean().item(),
                                                     abs=1e-6)
    assert sorted(r["index"] for r in result["per_class"]) == sorted(set(labels.tolist()))
    wrong = {}
    for t, p in zip(labels.tolist(), predicted.tolist(), strict=True):
        if t != p:
            wrong[(t, p)] = wrong.get((t, p), 0) + 1
    assert {(c["true"], c["predicted"]): c["count"] for c in result["confused"]} == wrong
    for example, key, probs, label in zip(result["examples"], expected["keys"], expected["centre"], labels,
                                          strict=False):
        assert (example["key"], example["label"]) == (key, int(label))
        assert example["top5"] == probs.topk(5).indices.tolist()
        assert example["top5_prob"] == pytest.approx(probs.topk(5).values.tolist(), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_the_stages_loader_and_predict_give_each_images_probabilities_as_computed_here(model, expected, tiny_data,
                                                                                        loader):
    """Per image, not only the error rates: centre crop, and 10-crop as the mean of the ten views' softmaxes."""
    pca = Pca.read(tiny_data["pca"])
    for view in ("centre", "ten_crop"):
        batches = make_eval_loader(tiny_data["val"], pca, 7, loader=loader, crop=224, ten_crop=view == "ten_crop",
                                   num_threads=2 if loader == "dali" else 0)
        probs, labels = class_probabilities(model, batches)
        assert torch.equal(labels, expected["labels"])
        assert torch.allclose(probs, expected[view], atol=1e-6, rtol=0), view


@pytest.mark.slow
@pytest.mark.parametrize("option", [("--batch-size", "1"), ("--loader", "torch")], ids=["batch-size-1", "torch"])
def test_batch_size_and_loader_do_not_change_the_result(evaluated, tiny_data, checkpoint, cli, tmp_path, option):
    cli("eval", checkpoint, "--val", tiny_data["val"], "--out", tmp_path / "eval", "--batch-size", 7, "--devices",
        "cpu", *option)
    assert without_throughput(eval_json(tmp_path / "eval")) == without_throughput(eval_json(evaluated))


@pytest.mark.slow
def test_rerun_is_up_to_date_and_rewrites_nothing(evaluated, tiny_data, checkpoint, cli):
    before = {p.name: p.stat().st_mtime_ns for p in evaluated.iterdir() if p.is_file()}
    out = cli("eval", checkpoint, "--val", tiny_data["val"], "--out", evaluated, "--batch-size", 7, "--devices", "cpu")
    assert "up to date" in out.stdout + out.stderr
    assert {p.name: p.stat().st_mtime_ns for p in evaluated.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_an_up_to_date_eval_returns_without_importing_torch(evaluated, tiny_data, checkpoint):
    """The Makefile calls eval on every `make eval`: finding it up to date must not cost torch's import."""
    code = ("import sys; from pathlib import Path; from stages import evaluate; "
            f"result = evaluate.run(Path({str(checkpoint)!r}), Path({str(tiny_data['val'])!r}), "
            f"Path({str(evaluated)!r}), devices='cpu'); print(result.up_to_date, 'torch' in sys.modules)")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["True", "False"]


@pytest.mark.slow
def test_centre_only_eval_has_no_ten_crop_entry(evaluated, tiny_data, checkpoint, cli, tmp_path):
    cli("eval", checkpoint, "--val", tiny_data["val"], "--out", tmp_path / "eval", "--no-ten-crop", "--devices",
        "cpu")
    result = eval_json(tmp_path / "eval")
    assert "ten_crop" not in result and result["centre"] == {**eval_json(evaluated)["centre"],
                                                             THROUGHPUT: result["centre"][THROUGHPUT]}


@pytest.mark.parametrize("what", ["missing checkpoint", "run without checkpoints"])
def test_eval_of_a_missing_checkpoint_is_a_one_line_error(tiny_data, cli_here, tmp_path, what):
    target = tmp_path / "run" / "checkpoints" / "step-000000099.pt"
    if what == "run without checkpoints":
        target.parent.mkdir(parents=True)
        target = tmp_path / "run"
    out = cli_here("eval", target, "--val", tiny_data["val"], "--out", tmp_path / "eval", "--devices", "cpu",
                   check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], out.stderr
    assert not (tmp_path / "eval" / "eval.json").exists()
