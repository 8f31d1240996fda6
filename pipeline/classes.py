"""What each output of fc8 means: the class table a run stores in its checkpoints (from its shards' manifests), and
the check that val shards label their images with the same table."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipeError
from pipeline.imagenet import ClassTable, ilsvrc2012_classes
from pipeline.records import Manifest, RunClasses


def run_classes(train: Manifest, val: Manifest) -> RunClasses:
    """The name of every output (index → wnid and name, for num_classes_total outputs): the built-in ILSVRC-2012
    list when the shards used it, else what the manifests name ("" for the rest); and the outputs trained."""
    total = train.num_classes_total
    if train.params.classes == "ilsvrc2012" and total == 1000:
        builtin = ilsvrc2012_classes()
        wnids, names = list(builtin.wnids), list(builtin.names)
    else:
        wnids, names = [""] * total, [""] * total
    for entry in (*train.classes, *val.classes):
        if entry.index < total and not wnids[entry.index]:
            wnids[entry.index], names[entry.index] = entry.wnid, entry.name
    return RunClasses(tuple(wnids), tuple(names), tuple(c.index for c in train.classes))


def class_table(classes: RunClasses | None) -> ClassTable:
    """The table of a run's outputs; checkpoints from before it was stored used the built-in ILSVRC-2012 list."""
    return ilsvrc2012_classes() if classes is None else ClassTable(classes.wnids, classes.names)


def val_class_problems(classes: RunClasses | None, val: Manifest, val_dir: Path) -> list[str]:
    """Refuse val shards whose (index, wnid) differ from the model's class table (made with another class list),
    naming the first difference; the warnings for val classes the model never trained on."""
    wnids = class_table(classes).wnids
    trained = set(classes.trained) if classes is not None else set(range(len(wnids)))
    for entry in val.classes:
        model_wnid = wnids[entry.index] if entry.index < len(wnids) else None
        if model_wnid != entry.wnid:
            found = f"{model_wnid}" if model_wnid is not None else f"no output {entry.index} ({len(wnids)} outputs)"
            raise PipeError(f"{val_dir}: val class {entry.index} is {entry.wnid} but the model's class {entry.index} "
                            f"is {found}; expected val shards made with the class list of the training shards "
                            "(--classes)")
    untrained = [e.wnid for e in val.classes if e.index not in trained]
    if untrained:
        return [f"{val_dir}: {len(untrained)} val class(es) the model never trained on (first: {untrained[0]}); "
                "they count as errors"]
    return []
