"""The plan of the demo set: which image goes where and how it is encoded (the quirk files among them), decided
before any pixel is drawn."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SPLITS = ("train", "val")


QUIRKS = ("grayscale", "cmyk", "png")  # ImageNet's odd files, one of each per split


_SEED_VAL_ORDER, _SEED_QUIRKS = 1000, 1001  # stream ids next to the split ids 0 (train) and 1 (val)


@dataclass(frozen=True)
class ImageSpec:
    """One image: its generator key (seed, split, label, index), its file number and how it is encoded."""

    seed: int
    split: str
    label: int
    index: int  # 0-based within (split, label)
    number: int  # train: n of <wnid>_<n>.JPEG; val: the 8-digit number of ILSVRC2012_val_<n>.JPEG
    kind: str = "rgb"  # or one of QUIRKS


@dataclass(frozen=True)
class Plan:
    """Every image of the set, per split, in writing order."""

    train: list[ImageSpec]
    val: list[ImageSpec]

    def split(self, name: str) -> list[ImageSpec]:
        return self.train if name == "train" else self.val


def plan_images(seed: int, classes: int, train_per_class: int, val_per_class: int) -> Plan:
    train = [ImageSpec(seed, "train", c, i, i + 1)
             for c in range(classes) for i in range(train_per_class)]
    pairs = [(c, i) for c in range(classes) for i in range(val_per_class)]
    order = np.random.default_rng([seed, _SEED_VAL_ORDER]).permutation(len(pairs))  # val mixes the classes
    val = [ImageSpec(seed, "val", pairs[j][0], pairs[j][1], n) for n, j in enumerate(order.tolist(), 1)]
    for split_id, specs in enumerate((train, val)):
        picks = np.random.default_rng([seed, _SEED_QUIRKS, split_id]).choice(len(specs), min(3, len(specs)),
                                                                               replace=False)
        for kind, k in zip(QUIRKS, picks.tolist(), strict=False):
            specs[k] = replace(specs[k], kind=kind)
    return Plan(train, val)


def file_name(spec: ImageSpec, wnids: tuple[str, ...]) -> str:
    if spec.split == "train":
        return f"{wnids[spec.label]}_{spec.number}.JPEG"
    return f"ILSVRC2012_val_{spec.number:08d}.JPEG"
