"""The shards as other libraries read them, with nothing but the folder: webdataset (raw bytes) and timm's `wds`
reader (through the `_info.json` the shard stage writes), against the DALI index and the torch reference loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.artifacts import PixelStats
from pipeline.augment import ReferenceEvalLoader, centre_crop_box
from pipeline.augment.loading import ShardSet
from pipeline.augment.reference import decode_rgb, shard_samples
from stages import QuietReporter
from stages import shard as shard_stage

SPLITS = ("train", "val")


def indexed_samples(shard_dir: Path) -> list[tuple[str, bytes, int]]:
    """(key, jpg bytes, label) of every sample, in reading order, from the byte ranges of the DALI index files."""
    out = []
    for ref in shard_samples(ShardSet.open(shard_dir)):
        with open(ref.tar, "rb") as f:
            f.seek(ref.jpg[0])
            jpg = f.read(ref.jpg[1])
            f.seek(ref.cls[0])
            out.append((ref.key, jpg, int(f.read(ref.cls[1]))))
    return out


@pytest.mark.parametrize("split", SPLITS)
def test_info_json_lists_every_shard_with_its_size_from_the_manifest(sample_shards, split):
    manifest = json.loads((sample_shards[split] / "manifest.json").read_text())
    info = json.loads((sample_shards[split] / "_info.json").read_text())
    entry = info["splits"][split]
    assert info["name"] == "ilsvrc2012" and list(info["splits"]) == [split] and entry["name"] == split
    assert entry["filenames"] == [s["name"] for s in manifest["shards"]] and len(entry["filenames"]) > 1
    assert entry["shard_lengths"] == [s["samples"] for s in manifest["shards"]]
    assert entry["num_samples"] == manifest["samples"] == sum(entry["shard_lengths"])


@pytest.mark.parametrize("split", SPLITS)
def test_webdataset_reads_the_keys_labels_and_bytes_of_the_dali_index(sample_shards, split):
    import webdataset as wds

    folder = sample_shards[split]
    urls = [str(folder / s["name"]) for s in json.loads((folder / "manifest.json").read_text())["shards"]]
    theirs = [(s["__key__"], s["jpg"], int(s["cls"])) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert theirs == indexed_samples(folder)


@pytest.mark.parametrize("split", SPLITS)
def test_timm_create_dataset_reads_the_folder_alone_as_the_reference_loader_does(sample_shards, one_thread, split):
    from timm.data import create_dataset

    folder = sample_shards[split]
    dataset = create_dataset("wds/imagenet", root=str(folder), split=split)  # no shard list, no size
    ours = indexed_samples(folder)
    assert len(dataset) == len(ours) == json.loads((folder / "manifest.json").read_text())["samples"]
    assert dataset.reader.filenames() == [key + ".JPEG" for key, _, _ in ours]
    read = list(dataset)
    assert [int(label) for _, label in read] == [label for _, _, label in ours]
    for (image, _), (key, jpg, _) in zip(read, ours, strict=True):
        assert np.array_equal(np.asarray(image), decode_rgb(jpg).permute(1, 2, 0).numpy()), key
    # the reference loader (the DALI path's parity oracle), mean 0: timm's image's centre crop, label for label
    reference = ReferenceEvalLoader(folder, PixelStats((0.0,) * 3, (0.0,) * 3, ((1.0, 0.0, 0.0),) * 3), 16,
                                    num_threads=0)
    patches, labels = (torch.cat(t) for t in zip(*reference, strict=True))
    assert labels.tolist() == [int(label) for _, label in read]
    for patch, (image, _) in zip(patches, read, strict=True):
        box = centre_crop_box(*image.size, 224)
        assert torch.equal(patch, torch.from_numpy(np.array(image.crop(box))).permute(2, 0, 1).float())


def test_an_up_to_date_folder_gets_info_json_without_resharding(sample_tree, tmp_path):
    out = tmp_path / "val"
    shard_stage.run(sample_tree, out, split="val", shard_size=16, workers=1)
    written = (out / "_info.json").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "_info.json"}
    (out / "_info.json").unlink()  # as in a folder sharded before the file existed
    reporter = QuietReporter()
    result = shard_stage.run(sample_tree, out, split="val", shard_size=16, workers=1, reporter=reporter)
    assert result.up_to_date and reporter.messages == [f"shard val: up to date ({out})"]
    assert (out / "_info.json").read_text() == written
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "_info.json"} == before

