"""Take a trained network to other runtimes: `torch.export` (`.pt2`) always, ONNX through torch's exporter when the
optional `export` extra (onnx, onnxscript, onnxruntime) is installed.

Both take float32 [batch, 3, crop, crop] with a dynamic batch and give the logits [batch, num_classes]. What the
model expects in front of it (short side, crop, the mean to subtract, the class list) is stored with the file: the
`.pt2` archive's extra file `preprocessing.json`, the ONNX model's metadata entry of the same name.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from pipeline.engine import atomic_write, canonical_json
from pipeline.errors import PipeError
from pipeline.predict import Classifier
from pipeline.records import ClassEntry, ExportedFrom, Preprocessing

FORMATS = ("pt2", "onnx")
PREPROCESSING = "preprocessing.json"
ONNX_EXTRA = "pip install 'alexnet-pipe[export]' (onnx, onnxscript, onnxruntime)"
MAX_BATCH = 1 << 16


def preprocessing(classifier: Classifier, checkpoint_sha256: str) -> Preprocessing:
    """What an exported file's input must be, and what its outputs index."""
    config = classifier.spec.model
    classes = classifier.classes
    return Preprocessing(
        input="float32 [batch, 3, crop, crop], RGB on the 0-255 scale minus mean_255 (no division by a std)",
        output="logits [batch, num_classes]; softmax for probabilities (10-crop: average the 10 softmaxes)",
        short_side=classifier.spec.short_side, crop=config.crop,
        test_crop="centre crop×crop of the central short_side square, or the 4 corners + centre and mirrors",
        mean_255=tuple(round(255.0 * m, 6) for m in classifier.mean),
        num_classes=config.num_classes,
        classes=tuple(ClassEntry(i, classes.wnids[i], classes.names[i])
                      for i in range(min(config.num_classes, len(classes.wnids)))),
        model=config,
        checkpoint=ExportedFrom(checkpoint_sha256, classifier.step, classifier.epoch),
    )


def _example(classifier: Classifier) -> tuple[tuple[torch.Tensor], tuple[dict]]:
    crop = classifier.spec.model.crop
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return (torch.zeros(2, 3, crop, crop, device=classifier.device),), ({0: batch},)


def export_program(classifier: Classifier) -> torch.export.ExportedProgram:
    """The eval-mode model (dropout off) as an ExportedProgram with a dynamic batch dimension."""
    args, dynamic = _example(classifier)
    return torch.export.export(classifier.model.eval(), args, dynamic_shapes=dynamic)


def onnx_model_bytes(classifier: Classifier, metadata: Preprocessing):
    """The ONNX model (input `image`, output `logits`) with `metadata` under PREPROCESSING, serialized."""
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch's exporter needs it; fail here with the install line, not deep inside
    except ImportError as e:
        raise PipeError(f"onnx needs the optional export extra ({e.name} is not installed): {ONNX_EXTRA}",
                        option="format") from None
    args, dynamic = _example(classifier)
    program = torch.onnx.export(classifier.model.eval(), args, dynamic_shapes=dynamic, dynamo=True,
                                input_names=["image"], output_names=["logits"], verbose=False)
    assert program is not None  # dynamo=True returns the program
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {PREPROCESSING: canonical_json(metadata.to_json())})
    return proto.SerializeToString()


def export_format(out: Path, fmt: str | None) -> str:
    """The format asked for, checked; by default the one `out`'s suffix names (.pt2, .onnx): a file named for
    neither is refused rather than written in a format its name does not say."""
    if fmt is None:
        fmt = out.suffix.removeprefix(".")
        if fmt not in FORMATS:
            raise PipeError(f"{out}: expected a file name ending in {' or '.join('.' + f for f in FORMATS)} (or a "
                            f"format given), found {out.suffix or 'no suffix'!r}", option="out")
    if fmt not in FORMATS:
        raise PipeError(f"expected one of {', '.join(FORMATS)}, got {fmt!r}", option="format")
    return fmt


def export(classifier: Classifier, out: Path, fmt: str, checkpoint_sha256: str) -> Path:
    """Write `out` atomically in `fmt` (pt2 or onnx); a crash or signal leaves no half-written file."""
    fmt = export_format(out, fmt)
    metadata = preprocessing(classifier, checkpoint_sha256)
    if fmt == "onnx":
        data = onnx_model_bytes(classifier, metadata)
    else:
        buffer = io.BytesIO()
        torch.export.save(export_program(classifier), buffer,
                          extra_files={PREPROCESSING: canonical_json(metadata.to_json())})
        data = buffer.getvalue()
    with atomic_write(out) as f:
        f.write(data)
    return out


def load_preprocessing(path: Path) -> Preprocessing:
    """The PREPROCESSING record stored in an exported `.pt2` or `.onnx` file."""
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return Preprocessing.from_json(json.loads(props[PREPROCESSING]))
    extra = {PREPROCESSING: ""}
    torch.export.load(path, extra_files=extra)
    return Preprocessing.from_json(json.loads(extra[PREPROCESSING]))
