"""`alexnet-pipe export`: the `.pt2` program and the ONNX model (run by onnxruntime) give the checkpoint's logits on
real ImageNet files, at the paper's width and a narrow one, for checkpoints trained a few steps from PyTorch's
default init (from §5's N(0, 0.01) the outputs are nearly uniform and a wrong export would agree too). The same
weights under the other LRN convention are the negative control: they must miss the tolerance."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import AlexNetConfig
from pipeline.engine import sha256_file
from pipeline.errors import PipeError
from pipeline.export import PREPROCESSING, export, load_preprocessing, preprocessing
from pipeline.model import build_model
from pipeline.predict import Classifier, image_views, load_classifier

RELATIVE_TOLERANCE = 1e-4  # of max|logit|
FILES = ("val/ILSVRC2012_val_00000007.JPEG", "val/ILSVRC2012_val_00000012.JPEG",
         "train/n02105855/n02105855_2933.JPEG")  # the last: ILSVRC-2012's PNG named .JPEG


@pytest.fixture(scope="module")
def paper_width_run(tiny_data, cli, train_cmd, tmp_path_factory) -> Path:
    """The paper's width (60,965,224 parameters), two steps from the default init."""
    out = tmp_path_factory.mktemp("paper-width") / "run"
    cli(*train_cmd(tiny_data, out, width=1, max_steps=2, epochs=1, keep_checkpoints=1))
    return out


@pytest.fixture(scope="module", params=["narrow", "paper"])
def trained(request, tiny_run) -> tuple[Path, Classifier]:
    """(checkpoint, its classifier): width 0.125 after 18 steps, or width 1 after 2."""
    run = tiny_run if request.param == "narrow" else request.getfixturevalue("paper_width_run")
    checkpoint = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    classifier = load_classifier(checkpoint, "cpu")
    model = classifier.spec.model
    assert model.init == "default" and model.width == (0.125 if request.param == "narrow" else 1.0)
    return checkpoint, classifier


@pytest.fixture(scope="module")
def images(sample_dir, tiny_run) -> torch.Tensor:
    """Three real files through predict's preprocessing (the mean is the same in both runs: one pca.json)."""
    mean = load_classifier(sorted((tiny_run / "checkpoints").glob("step-*.pt"))[-1], "cpu").mean
    return torch.stack([image_views((sample_dir / f).read_bytes(), mean, 224, False, 256) for f in FILES])


def within_tolerance(theirs, logits: torch.Tensor) -> bool:
    theirs = torch.as_tensor(theirs)
    assert theirs.shape == logits.shape
    return bool((theirs - logits).abs().max() <= RELATIVE_TOLERANCE * logits.abs().max())


@pytest.fixture(scope="module")
def logits(trained, images) -> torch.Tensor:
    with torch.no_grad():
        out = trained[1].model(images)
    # nearly uniform logits (as from §5's init) could not tell a wrong export from a right one
    assert out.std(dim=1).min() > 100 * RELATIVE_TOLERANCE * out.abs().max()
    return out


@pytest.mark.slow
def test_negative_control_the_other_lrn_convention_misses_the_tolerance(trained, images, logits):
    _, classifier = trained
    other = {"paper": "caffe", "caffe": "paper"}[classifier.spec.model.lrn_convention]
    twin = build_model(AlexNetConfig.from_dict({**classifier.spec.model.to_dict(), "lrn_convention": other}))
    twin.load_state_dict(classifier.model.state_dict())
    with torch.no_grad():
        assert not within_tolerance(twin.eval()(images), logits)


def export_cli(*args) -> str:
    """`alexnet-pipe export ARGS` in this process (the command's own code, without a second torch start-up)."""
    from typer.testing import CliRunner

    from cli.main import app

    run = CliRunner().invoke(app, ["export", *map(str, args)])
    if run.exception:
        raise run.exception
    return run.stderr


@pytest.mark.slow
def test_pt2_program_gives_the_models_logits_at_any_batch_with_its_preprocessing(trained, images, logits,
                                                                                   tmp_path):
    checkpoint, classifier = trained
    path = tmp_path / "deploy" / "model.pt2"
    message = export_cli(checkpoint, "--out", path)
    assert f"export: {checkpoint} (step {classifier.step}) → {path} (pt2, dynamic batch)" in message
    assert [p.name for p in path.parent.iterdir()] == ["model.pt2"]  # nothing half-written beside it
    program = torch.export.load(path).module()
    with torch.no_grad():
        assert within_tolerance(program(images), logits)
        assert within_tolerance(program(images[:1]), logits[:1])  # the batch dimension is dynamic
    stored = load_preprocessing(path)
    assert stored == preprocessing(classifier, sha256_file(checkpoint))
    assert stored.mean_255 == pytest.approx([255 * m for m in classifier.mean]) and stored.crop == 224
    assert [c.wnid for c in stored.classes] == list(classifier.classes.wnids) and stored.short_side == 256


@pytest.mark.slow
def test_onnx_model_in_onnxruntime_gives_the_models_logits_at_any_batch(trained, images, logits, tmp_path):
    import onnxruntime

    checkpoint, classifier = trained
    path = tmp_path / "model.onnx"
    assert "(onnx, dynamic batch)" in export_cli(checkpoint, "--out", path)  # the format from the suffix
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch" and session.get_outputs()[0].name == "logits"
    assert within_tolerance(session.run(None, {"image": images.numpy()})[0], logits)
    assert within_tolerance(session.run(None, {"image": images[1:].numpy()})[0], logits[1:])
    assert load_preprocessing(path) == preprocessing(classifier, sha256_file(checkpoint))
    assert PREPROCESSING in session.get_modelmeta().custom_metadata_map


@pytest.mark.slow
def test_export_refuses_an_unknown_format_and_writes_nothing(tiny_run, tmp_path):
    with pytest.raises(PipeError, match=r"^expected one of pt2, onnx, got 'tflite'$") as refused:
        export_cli(tiny_run, "--out", tmp_path / "model.bin", "--format", "tflite")
    assert refused.value.option == "format"  # the CLI shows it as --format
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_onnx_without_the_export_extra_says_how_to_install_it(tiny_run, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as in an install without the extra: `import onnx` fails
    classifier = load_classifier(sorted((tiny_run / "checkpoints").glob("step-*.pt"))[-1], "cpu")
    with pytest.raises(PipeError, match=r"needs the optional export extra \(onnx is not installed\): "
                                        r"pip install 'alexnet-pipe\[export\]'"):
        export(classifier, tmp_path / "model.onnx", "onnx", "0" * 64)
    assert not (tmp_path / "model.onnx").exists()
