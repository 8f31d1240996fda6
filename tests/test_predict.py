"""`alexnet-pipe predict` on real ImageNet files: its network input is bit for bit what the eval path feeds from the
shards of the same files, its probabilities are the model's, and unreadable files are one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.augment import ReferenceEvalLoader
from pipeline.augment.loading import ShardSet, sample_index
from pipeline.errors import PipeError
from pipeline.images import BadImage
from pipeline.predict import Classifier, classify, image_views, load_classifier

PNG_AS_JPEG = "train/n02105855/n02105855_2933.JPEG"  # ILSVRC-2012's PNG (RGBA) named .JPEG
GRAYSCALE = "train/n02692877/n02692877_airship.JPEG"
RGB = "val/ILSVRC2012_val_00000007.JPEG"


@pytest.fixture(scope="module")
def classifier(tiny_run) -> Classifier:
    return load_classifier(sorted((tiny_run / "checkpoints").glob("step-*.pt"))[-1], "cpu")


@pytest.fixture(scope="module")
def photos(sample_dir, tmp_path_factory) -> dict[str, Path]:
    """A user's folder: a PNG named .JPEG, a grayscale JPEG, an RGB JPEG, a CMYK JPEG made from it, and two files
    that are not images (a truncated JPEG, a text file)."""
    folder = tmp_path_factory.mktemp("photos")
    files = {name: folder / Path(name).name for name in (PNG_AS_JPEG, GRAYSCALE, RGB)}
    for name, path in files.items():
        shutil.copy(sample_dir / name, path)
    files["cmyk"] = folder / "cmyk.jpg"
    Image.open(sample_dir / RGB).convert("CMYK").save(files["cmyk"], "JPEG")
    files["truncated"] = folder / "truncated.jpeg"
    files["truncated"].write_bytes((sample_dir / RGB).read_bytes()[:2000])
    files["text"] = folder / "notes.png"
    files["text"].write_text("not an image")
    return files


@pytest.mark.slow
@pytest.mark.parametrize(("split", "ten_crop"), [("train", False), ("val", True)])
def test_network_input_is_bit_identical_to_the_eval_paths_from_the_shards_of_the_same_files(
        sample_dir, sample_shards, classifier, one_thread, split, ten_crop):
    """train holds the PNG named .JPEG and the grayscale files; val's 10 views include the centre crop."""
    shards = ShardSet.open(sample_shards[split])
    files = {p.stem: p for p in (sample_dir / split).rglob("*.JPEG")}
    loader = ReferenceEvalLoader(sample_shards[split], classifier.spec.pixels, 16, ten_crop=ten_crop,
                                 num_threads=0)
    theirs = torch.cat([images for images, _ in loader])
    keys = list(sample_index(shards).keys)
    assert len(keys) == len(files) == len(theirs)
    for key, expected in zip(keys, theirs, strict=True):
        ours = image_views(files[key].read_bytes(), classifier.mean, 224, ten_crop, 256)
        assert torch.equal(ours, expected), key


@pytest.mark.slow
def test_unreadable_bytes_raise_bad_image(photos, classifier):
    for name in ("truncated", "text"):
        with pytest.raises(BadImage):
            image_views(photos[name].read_bytes(), classifier.mean, 224, False, 256)


def expected_probabilities(classifier: Classifier, path: Path, ten_crop: bool) -> torch.Tensor:
    """The model's softmax, computed here one view at a time (10-crop: the mean of the ten softmaxes)."""
    views = image_views(path.read_bytes(), classifier.mean, 224, ten_crop, 256)
    views = views if ten_crop else views[None]
    with torch.no_grad():
        return torch.stack([torch.softmax(classifier.model(v[None]), dim=1)[0] for v in views]).mean(dim=0)


def check_probabilities(classifier: Classifier, records: list[dict], ten_crop: bool) -> None:
    """`records` as predict's --json writes them (`Prediction.to_json`)."""
    for record in records:
        if "top" in record:
            probs = expected_probabilities(classifier, Path(record["path"]), ten_crop)
            got = torch.zeros(1000, dtype=torch.float64)
            got[[c["index"] for c in record["top"]]] = torch.tensor([c["probability"] for c in record["top"]],
                                                                     dtype=torch.float64)
            assert torch.allclose(got, probs.double(), atol=2e-6), record["path"]
            best = record["top"][0]
            assert (best["wnid"], best["name"]) == (classifier.classes.wnids[best["index"]],
                                                    classifier.classes.names[best["index"]])


@pytest.mark.slow
def test_predict_cli_classifies_every_readable_format_and_reports_each_unreadable_file(cli, tiny_run, classifier,
                                                                                       photos, one_thread):
    folder = photos["text"].parent
    run = cli("predict", tiny_run, folder, folder / "missing.jpg", "--json", "--top", 1000, "--ten-crop",
              "--batch-size", 2, "--devices", "cpu")
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [Path(r["path"]).name for r in records] == sorted(p.name for p in folder.iterdir()) + ["missing.jpg"]
    errors = {Path(r["path"]).name: r["error"] for r in records if "error" in r}
    assert set(errors) == {"truncated.jpeg", "notes.png", "missing.jpg"}
    assert errors["missing.jpg"] == "no such file or folder" and errors["notes.png"].startswith("undecodable")
    warnings = [line for line in run.stderr.splitlines() if "not classified" in line]
    assert len(warnings) == 3 and all(str(folder) in w for w in warnings)
    assert "predict: 4 image(s) classified, 3 not (10-crop" in run.stderr
    trained = len(classifier.spec.classes.trained)  # a net of a few generated classes says so before it answers
    assert trained < 1000 and f"warning: predict: this net was trained on only {trained} classes (" in run.stderr
    check_probabilities(classifier, records, ten_crop=True)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 3])
def test_centre_crop_probabilities_are_the_models_whatever_the_batch(classifier, photos, one_thread, batch_size):
    records = [p.to_json() for p in classify(classifier, [photos["text"].parent], top=1000, batch_size=batch_size)]
    assert sum("top" in r for r in records) == 4
    check_probabilities(classifier, records, ten_crop=False)


@pytest.mark.slow
def test_predict_prints_top_k_lines(tiny_run, photos):
    from typer.testing import CliRunner

    from cli.main import app

    run = CliRunner().invoke(app, ["predict", str(tiny_run), str(photos[GRAYSCALE]), "--top", "3", "--devices",
                                   "cpu"])
    lines = run.stdout.splitlines()
    assert run.exit_code == 0 and lines[:4] == [str(photos[GRAYSCALE]), *lines[1:4]] and len(lines) >= 4
    assert [line[:5] for line in lines[1:4]] == ["  1. ", "  2. ", "  3. "]
    not_a_checkpoint = CliRunner().invoke(app, ["predict", str(photos["text"]), str(photos[RGB])])
    assert isinstance(not_a_checkpoint.exception, PipeError) and str(not_a_checkpoint.exception) == (
        f"{photos['text']}: expected a checkpoint written by `alexnet-pipe train`, found a file that is not a "
        "complete zip archive (cut short, or not a checkpoint)")


@pytest.mark.slow
def test_predict_exits_2_with_one_line_when_no_image_is_readable(cli, tiny_run, photos):
    bad = cli("predict", tiny_run, photos["truncated"], photos["text"], "--devices", "cpu", check=False)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-1] == ("error: predict: expected at least one readable image, found none "
                                           "among 2 path(s)")
