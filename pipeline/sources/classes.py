"""ImageNet's label tables: the 1,000 ILSVRC-2012 wnids in sorted order (the global label order), the devkit IDs,
and a run's classes (which outputs its training shards held, and val classes it never trained on).

Labels are always the index of the wnid in `LOC_synset_mapping.txt` order (= sorted wnids = torchvision's
ImageFolder on full ImageNet = Keras), also for a subset of classes. The devkit's
`ILSVRC2012_validation_ground_truth.txt` holds *devkit IDs* (meta.mat order), which are NOT sorted indices:
ID 1 is n02119789 (sorted index 278).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from pipeline.errors import PipeError
from pipeline.records import Manifest, RunClasses


@dataclass(frozen=True)
class ClassTable:
    """Wnids in label order, with their human-readable names."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]

    @cache  # noqa: B019 - tables are few and immutable
    def index(self) -> dict[str, int]:
        return {wnid: i for i, wnid in enumerate(self.wnids)}

    def label_of(self, wnid: str) -> int:
        try:
            return self.index()[wnid]
        except KeyError:
            raise PipeError(f"wnid {wnid!r} is not in the class list ({len(self.wnids)} classes)") from None


def parse_synset_mapping(text: str, source: str) -> ClassTable:
    """Parse `LOC_synset_mapping.txt` lines: `n01440764 tench, Tinca tinca`, in label order."""
    wnids, names = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not (wnid.startswith("n") and wnid[1:].isdigit()):
            raise PipeError(f"{source}:{lineno}: expected 'nXXXXXXXX name', found {line!r}")
        wnids.append(wnid)
        names.append(name.strip())
    if len(set(wnids)) != len(wnids):
        raise PipeError(f"{source}: the class list repeats a wnid")
    return ClassTable(tuple(wnids), tuple(names))


@cache
def ilsvrc2012_classes() -> ClassTable:
    """The 1,000 ILSVRC-2012 classes in sorted-wnid order (shipped with the package)."""
    text = resources.files("pipeline").joinpath("data/LOC_synset_mapping.txt").read_text()
    return parse_synset_mapping(text, "LOC_synset_mapping.txt")


def load_classes(path: Path | None = None) -> ClassTable:
    """`--classes FILE` (same format as LOC_synset_mapping.txt) or the ILSVRC-2012 list."""
    if path is None:
        return ilsvrc2012_classes()
    if not path.is_file():
        raise PipeError(f"class list not found: {path} (expected a LOC_synset_mapping.txt-style file)")
    return parse_synset_mapping(path.read_text(), str(path))


@cache
def devkit_id_to_wnid() -> dict[int, str]:
    """ILSVRC2012_ID (1..1000, the devkit's meta.mat order) → wnid, from the shipped `map_clsloc.txt`."""
    text = resources.files("pipeline").joinpath("data/map_clsloc.txt").read_text()
    mapping = {}
    for line in text.splitlines():
        if line.strip():
            wnid, devkit_id, _name = line.split(" ", 2)
            mapping[int(devkit_id)] = wnid
    return mapping


# ---------------------------------------------------------------------------------------------------------------
# a run's classes: what each output of fc8 means, and val shards labelled with the same table


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


def val_class_problems(classes: RunClasses | None, val: Manifest, val_dir: Path, *,
                       untrained_allowed: bool = False) -> list[str]:
    """Refuse val shards whose (index, wnid) differ from the model's class table (made with another class list),
    naming the first difference, and val shards holding classes the model never trained on (they would count as
    errors it could not avoid) unless `untrained_allowed`; then the warning for them."""
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
    if untrained and not untrained_allowed:
        raise PipeError(f"{val_dir}: expected val classes the training shards hold, found {len(untrained)} they lack "
                        f"({', '.join(untrained[:5])}{' …' if len(untrained) > 5 else ''}); shard both splits with the "
                        "same --max-classes, or accept them on purpose (--untrained-val-classes: they count as "
                        "errors)", option="val")
    if untrained:
        return [f"{val_dir}: {len(untrained)} val class(es) the model never trained on (first: {untrained[0]}); "
                "they count as errors"]
    return []
