"""Stage `shard` on real ImageNet files: every layout and label format, ImageNet's broken files, byte-identical
results whatever the workers / array tasks / kills, hostile archives; and the shards read back as other libraries
read them, with nothing but the folder: DALI's reader with our index, webdataset, and timm's `wds` reader through
the `_info.json` the stage writes."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import manifest, run_cli_here, samples, shard_set
from PIL import Image

from pipeline.augment import ReferenceEvalLoader, centre_crop_box
from pipeline.augment.loading import ShardSet, sample_index
from pipeline.augment.order import SampleReader
from pipeline.augment.reference import decode_rgb
from pipeline.engine import QuietReporter, fingerprint_source, inspect
from pipeline.images import BadImage, prepare_image, resized_size
from pipeline.records import PixelStats
from pipeline.shards import assign_shards
from pipeline.sources import Member, ilsvrc2012_classes
from stages import shard as shard_stage

CLI = str(Path(sys.executable).with_name("alexnet-pipe"))


SORTED_WNIDS = ilsvrc2012_classes().wnids  # the package's own LOC_synset_mapping.txt: the global label order

# The fixture files added to the real samples, and what the stage must do with them.
PNG_AS_JPEG = "n02105855_2933"  # real ILSVRC train file: PNG data (RGBA) under a .JPEG name
GRAYSCALE = {"n02692877_airship", "n03908714_pencil_sharpener", "n04254680_soccer_ball", "n15075141_13104",
             "n15075141_38508"}
CMYK_TRAIN = "n01440764_90001"
CMYK_VAL = "ILSVRC2012_val_00019877"  # the real CMYK val file's name; its label is n13133613 (index 998)
TRUNCATED = "n01440764_90002"
ZERO_BYTES = "n01443537_90003"
TRAIN_IMAGES = 210 + 3  # the samples + CMYK, truncated, zero-byte
TRAIN_GOOD = 211
VAL_1 = "ILSVRC2012_val_00000001"  # devkit ID 490 = n01751748, sorted index 65
VAL_IMAGES = 50 + 2


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The shard and verify commands' arguments, messages and exit codes: run inside this process."""
    return run_cli_here(*args, check=False, env=env)


def cli_process(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """As a separate process, where a test needs its own environment, working folder or signals."""
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)


def shards_only(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in shard_set(out).items() if k != "manifest.json"}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` with the size and mtime of files (a folder's mtime changes with transient
    entries such as multiprocessing's socket folder in $TMPDIR; what is left behind is what counts)."""
    return {str(p.relative_to(folder)): (0, 0) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def unit_files(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of the tar and idx of every finished shard unit."""
    stats = {}
    for record in (out / "_units").glob("*-0*.json"):
        for ext in ("tar", "idx"):
            st = (out / f"{record.stem}.{ext}").stat()
            stats[f"{record.stem}.{ext}"] = (st.st_ino, st.st_mtime_ns)
    return stats


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------------------------
# fixtures: the real samples plus ImageNet's traps, as an extracted tree and as the three official archives


@pytest.fixture(scope="module")
def quirk_tree(tmp_path_factory, sample_dir, meta_dir) -> Path:
    """train/<wnid>/ and flat val/ + LOC_val_solution.csv: the 260 real samples, a CMYK JPEG in each split, a
    truncated JPEG, a zero-byte file, and ILSVRC2012_val_00000001 (a real sea snake, as its label says)."""
    root = tmp_path_factory.mktemp("quirk-tree")
    shutil.copytree(sample_dir / "train", root / "train")
    shutil.copytree(sample_dir / "val", root / "val")
    shutil.copy(meta_dir / "LOC_val_solution.csv", root)
    tench = (sample_dir / "train" / "n01440764" / "n01440764_tench.JPEG").read_bytes()
    Image.open(io.BytesIO(tench)).convert("CMYK").save(root / "train" / "n01440764" / f"{CMYK_TRAIN}.JPEG", "JPEG")
    (root / "train" / "n01440764" / f"{TRUNCATED}.JPEG").write_bytes(tench[: len(tench) * 2 // 3])
    (root / "train" / "n01443537").mkdir()
    (root / "train" / "n01443537" / f"{ZERO_BYTES}.JPEG").write_bytes(b"")
    # no ear among the samples: the pixels are another real image, as with every val sample (SOURCES.md)
    earthstar = Image.open(sample_dir / "train" / "n13044778" / "n13044778_earthstar.JPEG")
    earthstar.convert("CMYK").save(root / "val" / f"{CMYK_VAL}.JPEG", "JPEG")
    shutil.copy(sample_dir / "train" / "n01751748" / "n01751748_sea_snake.JPEG", root / "val" / f"{VAL_1}.JPEG")
    return root


def make_official_archives(tree: Path, root: Path, meta: Path) -> Path:
    """ILSVRC2012_img_train.tar (a tar of per-class tars), the flat ILSVRC2012_img_val.tar and the devkit tar.gz
    (val labels as devkit IDs, meta.mat) from an extracted tree."""
    root.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for class_dir in sorted((tree / "train").iterdir()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for f in sorted(class_dir.iterdir()):
                    t.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{class_dir.name}.tar")
            info.size = inner.tell()
            outer.addfile(info, io.BytesIO(inner.getvalue()))
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        for f in sorted((tree / "val").iterdir()):
            val.add(f, arcname=f.name)
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as devkit:
        devkit.add(meta / "meta.mat", arcname="ILSVRC2012_devkit_t12/data/meta.mat")
        devkit.add(meta / "ILSVRC2012_validation_ground_truth.txt",
                   arcname="ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
    return root


@pytest.fixture(scope="module")
def official(tmp_path_factory, quirk_tree, meta_dir) -> Path:
    return make_official_archives(quirk_tree, tmp_path_factory.mktemp("official") / "ilsvrc2012", meta_dir)


@pytest.fixture(scope="module")
def tree_train(tmp_path_factory, quirk_tree) -> Path:
    """The reference train run: shards of 8 (27 shards), 2 workers, seed 0."""
    out = tmp_path_factory.mktemp("tree-train") / "train"
    shard_stage.run(quirk_tree, out, split="train", shard_size=8, workers=2)
    return out


@pytest.fixture(scope="module")
def tree_val(tmp_path_factory, quirk_tree) -> Path:
    out = tmp_path_factory.mktemp("tree-val") / "val"
    shard_stage.run(quirk_tree, out, split="val", shard_size=16, workers=1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# labels and coverage


@pytest.mark.slow
def test_every_good_train_image_is_in_exactly_one_shard_with_its_sorted_wnid_label(quirk_tree, tree_train):
    found = samples(tree_train)
    expected = {f.stem: f.parent.name for f in (quirk_tree / "train").glob("*/*.JPEG")}
    assert len(expected) == TRAIN_IMAGES
    assert set(found) == set(expected) - {TRUNCATED, ZERO_BYTES}
    for key, sample in found.items():
        assert set(sample) == {"shard", "cls", "jpg", "json"}
        wnid = expected[key]
        assert int(sample["cls"].decode("ascii")) == SORTED_WNIDS.index(wnid)
        meta = json.loads(sample["json"])
        assert (meta["key"], meta["wnid"], meta["label"]) == (key, wnid, SORTED_WNIDS.index(wnid))
    m = manifest(tree_train)
    assert m["samples"] == TRAIN_GOOD == sum(s["samples"] for s in m["shards"])
    assert len(m["shards"]) == 27 and {s["name"] for s in m["shards"]} == {p.name for p in tree_train.glob("*.tar")}
    assert [c["index"] for c in m["classes"]] == sorted(SORTED_WNIDS.index(w) for w in set(expected.values())
                                                      if w != "n01443537")  # its only file is empty
    assert m["classes"][0] == {"index": 0, "wnid": "n01440764", "name": "tench, Tinca tinca", "samples": 2}


def test_shards_mix_classes_in_a_seeded_order_and_another_seed_reshuffles(tree_val, quirk_tree, tmp_path):
    first_shard = [k for k, s in samples(tree_val).items() if s["shard"] == "val-000000.tar"]
    assert first_shard != sorted(first_shard)  # not the listing order
    other = tmp_path / "val-seed1"
    shard_stage.run(quirk_tree, other, split="val", shard_size=16, seed=1, workers=1)
    assert set(samples(other)) == set(samples(tree_val))
    assert shards_only(other) != shards_only(tree_val)


@pytest.mark.parametrize("layout", ["kaggle-csv-beside-tree", "devkit-tar-in-official-root",
                                    "devkit-txt-as-labels", "devkit-tar-as-labels"])
def test_val_labels_are_the_same_from_kaggle_csv_and_devkit_ids(layout, quirk_tree, official, tree_val, meta_dir,
                                                                 tmp_path):
    out = tmp_path / "val"
    if layout == "kaggle-csv-beside-tree":
        out = tree_val
    elif layout == "devkit-tar-in-official-root":
        shard_stage.run(official, out, split="val", shard_size=16, workers=1)
    else:
        folder = tmp_path / "only-images" / "val"  # no labels beside it: they come from --labels
        shutil.copytree(quirk_tree / "val", folder)
        labels = (meta_dir / "ILSVRC2012_validation_ground_truth.txt" if layout == "devkit-txt-as-labels"
                  else official / "ILSVRC2012_devkit_t12.tar.gz")
        shard_stage.run(folder, out, split="val", labels=labels, shard_size=16, workers=1)
    found = samples(out)
    assert len(found) == VAL_IMAGES
    assert found[VAL_1]["cls"] == b"65"  # devkit ID 490 = n01751748, sorted index 65
    assert json.loads(found[VAL_1]["json"])["wnid"] == "n01751748"
    assert found[CMYK_VAL]["cls"] == b"998"  # devkit ID 329 = n13133613
    assert shards_only(out) == shards_only(tree_val)


@pytest.mark.slow
def test_extracted_tree_and_official_archives_give_byte_identical_shards(official, tree_train, tree_val, tmp_path):
    for split, size, reference in (("train", 8, tree_train), ("val", 16, tree_val)):
        out = tmp_path / split
        shard_stage.run(official, out, split=split, shard_size=size, workers=2)
        assert shards_only(out) == shards_only(reference)
        ours, theirs = manifest(out), manifest(reference)
        assert ours["shards"] == theirs["shards"] and ours["classes"] == theirs["classes"]
        assert ours["repaired"] == theirs["repaired"]
        assert [s["key"] for s in ours["skipped"]] == [s["key"] for s in theirs["skipped"]]
    inputs = json.loads((tmp_path / "val" / "_stage.json").read_text())["inputs"]
    assert inputs["source"]["path"] == str(official / "ILSVRC2012_img_val.tar")
    assert inputs["labels"]["path"] == str(official / "ILSVRC2012_devkit_t12.tar.gz")


def val_truth(meta: Path) -> dict[str, str]:
    return {row.split(",")[0]: row.split(",")[1].split()[0]
            for row in (meta / "LOC_val_solution.csv").read_text().splitlines()[1:]}


def test_val_in_class_folders_gives_the_same_shards_as_flat_val_with_labels(quirk_tree, tree_val, meta_dir, tmp_path):
    """valprep.sh's layout (val/<wnid>/*.JPEG) needs no ground-truth file."""
    truth = val_truth(meta_dir)
    for f in (quirk_tree / "val").iterdir():
        (tmp_path / "tree" / "val" / truth[f.stem]).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "tree" / "val" / truth[f.stem] / f.name)
    shard_stage.run(tmp_path / "tree", tmp_path / "val", split="val", shard_size=16, workers=1)
    assert shards_only(tmp_path / "val") == shards_only(tree_val)


@pytest.mark.parametrize("layout", ["flat", "class-folders"])
def test_symlinked_images_in_a_tree_are_read_through_their_links(layout, quirk_tree, tree_val, meta_dir, tmp_path):
    truth = val_truth(meta_dir)
    for f in (quirk_tree / "val").iterdir():
        link = tmp_path / "links" / "val" / (truth[f.stem] if layout == "class-folders" else "") / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
    shutil.copy(meta_dir / "LOC_val_solution.csv", tmp_path / "links")
    shard_stage.run(tmp_path / "links", tmp_path / "val", split="val", shard_size=16, workers=1)
    assert shards_only(tmp_path / "val") == shards_only(tree_val)


def test_a_shard_whose_images_are_all_bad_is_left_out_so_dali_can_read_the_rest(sample_dir, tmp_path):
    source = tmp_path / "src" / "train" / "n01440764"
    source.mkdir(parents=True)
    shutil.copy(sample_dir / "train" / "n01440764" / "n01440764_tench.JPEG", source / "n01440764_1.JPEG")
    for i in range(2, 6):
        (source / f"n01440764_{i}.JPEG").write_bytes(b"")
    out = tmp_path / "train"
    shard_stage.run(tmp_path / "src", out, split="train", shard_size=2, workers=1)
    m = manifest(out)
    assert m["samples"] == 1 and len(m["skipped"]) == 4 and [s["samples"] for s in m["shards"]] == [1]
    stem = m["shards"][0]["name"][: -len(".tar")]
    assert sorted(p.name for p in out.glob("train-*")) == [f"{stem}.idx", f"{stem}.tar"]
    assert cli("verify", out).returncode == 0

    from nvidia.dali import fn, pipeline_def

    tars = [str(out / s["name"]) for s in m["shards"]]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def read():
        return fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["cls"],
                                     name="reader")

    pipe = read()
    pipe.build()
    assert pipe.epoch_size("reader") == 1 and bytes(np.array(pipe.run()[0].at(0))) == b"0"


# ---------------------------------------------------------------------------------------------------------------
# ImageNet's traps


def test_png_cmyk_and_grayscale_files_are_repaired_to_rgb_and_listed(tree_train, tree_val):
    repaired = {r["key"]: r["repaired"] for r in manifest(tree_train)["repaired"]}
    assert repaired == {PNG_AS_JPEG: ["png→jpeg", "rgba→rgb"], CMYK_TRAIN: ["cmyk→rgb"],
                        **{key: ["l→rgb"] for key in GRAYSCALE}}
    assert manifest(tree_val)["repaired"] == [{"key": CMYK_VAL, "repaired": ["cmyk→rgb"]}]
    found = samples(tree_train)
    for key in repaired:
        img = Image.open(io.BytesIO(found[key]["jpg"]))
        assert (img.format, img.mode, min(img.size)) == ("JPEG", "RGB", 256)
        meta = json.loads(found[key]["json"])
        assert meta["repaired"] == repaired[key]
    png = json.loads(found[PNG_AS_JPEG]["json"])
    assert (png["format"], png["mode"], png["width"], png["height"]) == ("PNG", "RGBA", 213, 189)


def test_cmyk_repair_keeps_the_colours(tree_train):
    """Pillow's CMYK JPEGs are Adobe-inverted; a wrong inversion would give a negative image."""
    found = samples(tree_train)
    cmyk = np.asarray(Image.open(io.BytesIO(found[CMYK_TRAIN]["jpg"])), dtype=float)
    rgb = np.asarray(Image.open(io.BytesIO(found["n01440764_tench"]["jpg"])), dtype=float)
    assert cmyk.shape == rgb.shape and np.abs(cmyk - rgb).mean() < 4


def test_truncated_and_zero_byte_files_are_skipped_with_reasons_and_the_run_goes_on(tree_train):
    skipped = {s["key"]: s for s in manifest(tree_train)["skipped"]}
    assert set(skipped) == {TRUNCATED, ZERO_BYTES}
    assert "truncated" in skipped[TRUNCATED]["reason"]
    assert skipped[ZERO_BYTES]["reason"] == "empty file"
    assert skipped[ZERO_BYTES]["path"] == f"train/n01443537/{ZERO_BYTES}.JPEG"  # relative: no absolute paths


def test_every_sample_is_an_rgb_baseline_jpeg_with_short_side_256_and_its_metadata(tree_train, quirk_tree):
    for sample in samples(tree_train).values():
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
        meta = json.loads(sample["json"])
        w, h = meta["width"], meta["height"]
        assert img.size == resized_size(w, h, 256) and min(img.size) == 256
        assert abs(img.size[0] / img.size[1] - w / h) < 0.01
    original = Image.open(quirk_tree / "train" / "n01440764" / "n01440764_tench.JPEG")
    tench = json.loads(samples(tree_train)["n01440764_tench"]["json"])
    assert (tench["width"], tench["height"], tench["format"], tench["mode"]) == (*original.size, "JPEG", "RGB")


def test_resized_size_keeps_the_aspect_and_scales_small_images_up():
    assert resized_size(500, 375, 256) == (341, 256)
    assert resized_size(375, 500, 256) == (256, 341)
    assert resized_size(100, 50, 256) == (512, 256)
    assert resized_size(256, 256, 256) == (256, 256)
    assert resized_size(10000, 10, 256) == (256000, 256)


def test_prepare_image_sniffs_the_format_from_the_bytes_not_the_name(sample_dir):
    png = prepare_image((sample_dir / "train" / "n02105855" / f"{PNG_AS_JPEG}.JPEG").read_bytes())
    assert png.meta["format"] == "PNG" and png.meta["repaired"] == ["png→jpeg", "rgba→rgb"]
    for bad, reason in ((b"", "empty file"), (b"GIF89a not really", "undecodable"), (b"\xff\xd8\xff", "undecodable")):
        with pytest.raises(BadImage, match=reason):
            prepare_image(bad)


def test_palette_and_gray_alpha_pngs_become_rgb():
    for mode in ("P", "LA", "1", "I;16"):
        buf = io.BytesIO()
        Image.new(mode, (300, 200)).save(buf, "PNG")
        img = prepare_image(buf.getvalue())
        assert img.meta["repaired"] == ["png→jpeg", f"{mode.lower()}→rgb"]
        assert Image.open(io.BytesIO(img.jpeg)).mode == "RGB"


def test_assign_shards_is_a_seeded_partition_independent_of_listing_order():
    members = [Member(f"k{i:03d}", "n01440764", f"p{i}") for i in range(50)]
    shards = assign_shards(members, 8, seed=3)
    assert [len(s) for s in shards] == [8] * 6 + [2]
    assert sorted(m.key for s in shards for m in s) == [m.key for m in members]
    assert assign_shards(members[::-1], 8, seed=3) == shards
    assert assign_shards(members, 8, seed=4) != shards


# ---------------------------------------------------------------------------------------------------------------
# reading the shards back: DALI (with our .idx), webdataset, DALI's own index writer


def test_shards_read_back_in_dali_webdataset_reader_with_our_idx_files(tree_train):
    from nvidia.dali import fn, pipeline_def, types

    m = manifest(tree_train)
    tars = [str(tree_train / s["name"]) for s in m["shards"]]

    @pipeline_def(batch_size=32, num_threads=2, device_id=None)
    def read_all():
        jpg, cls, meta = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                               ext=["jpg", "cls", "json"], missing_component_behavior="error",
                                               name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, meta

    pipe = read_all()
    pipe.build()
    total = pipe.epoch_size("reader")
    assert total == m["samples"]
    labels, read = {}, 0
    while read < total:  # one epoch; the reader fills a last partial batch from the next one
        images, cls, meta = pipe.run()
        for i in range(min(len(images), total - read)):
            info = json.loads(bytes(np.array(meta.at(i))))
            assert min(np.array(images.at(i)).shape[:2]) == 256 and np.array(images.at(i)).shape[2] == 3
            labels[info["key"]] = int(bytes(np.array(cls.at(i))).decode())
            assert labels[info["key"]] == SORTED_WNIDS.index(info["wnid"])
            read += 1
    assert labels == {k: int(s["cls"]) for k, s in samples(tree_train).items()} and len(labels) == read


def test_shards_read_back_with_webdataset(tree_val):
    import webdataset as wds

    urls = [str(tree_val / s["name"]) for s in manifest(tree_val)["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        assert sample["jpg"].mode == "RGB" and min(sample["jpg"].size) == 256
        seen[sample["__key__"]] = int(sample["cls"])
    assert seen == {k: int(s["cls"]) for k, s in samples(tree_val).items()} and len(seen) == VAL_IMAGES


def test_our_idx_equals_what_dalis_index_creator_writes(tree_train, tmp_path):
    from wds2idx import IndexCreator

    for tar in sorted(tree_train.glob("*.tar")):
        theirs = tmp_path / f"{tar.stem}.idx"
        with IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert tar.with_suffix(".idx").read_text() == theirs.read_text(), tar.name


# ---------------------------------------------------------------------------------------------------------------
# determinism, kills, array tasks, caching


@pytest.mark.slow
def test_one_or_two_workers_give_byte_identical_shards_and_manifest(quirk_tree, tree_train, tmp_path):
    out = tmp_path / "train"
    run = cli("shard", quirk_tree, out, "--split", "train", "--shard-size", "8", "--workers", "1")
    assert run.returncode == 0, run.stderr
    assert f"{TRAIN_GOOD} written, {2 + len(GRAYSCALE)} repaired, 2 skipped" in run.stderr
    assert f"skipped {TRUNCATED} (train/n01440764/{TRUNCATED}.JPEG): undecodable" in run.stderr
    assert shard_set(out) == shard_set(tree_train)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_writes_only_missing_shards_and_is_byte_identical(quirk_tree, tree_train,
                                                                                     tmp_path):
    out = tmp_path / "train"
    proc = subprocess.Popen([CLI, "shard", str(quirk_tree), str(out), "--split", "train", "--shard-size", "8",
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((out / "_units").glob("train-*.json"))) < 3:
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = unit_files(out)
    assert 6 <= len(finished) < 54 and not (out / "manifest.json").exists()

    rerun = cli("shard", quirk_tree, out, "--split", "train", "--shard-size", "8", "--workers", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished) // 2} of 27 shards already written, kept" in rerun.stderr
    assert {name: (out / name).stat() for name in finished} and all(
        ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stat for name, stat in finished.items())
    assert shard_set(out) == shard_set(tree_train)
    assert temp_files(out) == []


def processes_with_env(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes() \
                    and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_sigkill_of_a_run_with_workers_leaves_no_worker_behind(quirk_tree, tmp_path):
    out, marker = tmp_path / "train", f"ALEXNET_PIPE_TEST_RUN={tmp_path.name}"
    proc = subprocess.Popen([CLI, "shard", str(quirk_tree), str(out), "--split", "train", "--shard-size", "8",
                             "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "ALEXNET_PIPE_TEST_RUN": tmp_path.name})
    deadline = time.monotonic() + 120
    while not list((out / "_units").glob("train-*.json")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    assert len(processes_with_env(marker)) >= 3  # the CLI, the forkserver and its workers
    proc.kill()  # the CLI alone, as the OOM killer would
    proc.wait()
    deadline = time.monotonic() + 10
    while processes_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with_env(marker) == []


def test_status_counts_the_shards_planned_after_the_index_unit(quirk_tree, tmp_path):
    out = tmp_path / "train"
    proc = subprocess.Popen([CLI, "shard", str(quirk_tree), str(out), "--split", "train", "--shard-size", "8",
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "_units").glob("train-*.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    state = inspect(out)
    done = len(list((out / "_units").glob("*.json")))
    assert (state.state, state.detail) == ("partial", f"{done} of 28 units")  # the index and 27 shards


def test_a_dangling_symlink_in_the_source_is_fingerprinted_not_fatal(tmp_path):
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "train" / "n01440764" / "a.JPEG").write_bytes(b"x")
    before = fingerprint_source(tmp_path)
    (tmp_path / "train" / "n01440764" / "b.JPEG").symlink_to(tmp_path / "gone.JPEG")
    assert fingerprint_source(tmp_path) != before


@pytest.mark.slow
def test_array_tasks_run_concurrently_give_the_bytes_of_one_process(quirk_tree, tree_train, tmp_path):
    out = tmp_path / "train"
    procs = [subprocess.Popen([CLI, "shard", str(quirk_tree), str(out), "--split", "train", "--shard-size", "8",
                               "--workers", "1", "--task-index", str(i), "--num-tasks", "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert any(f"{TRAIN_GOOD} written" in err for _, err in outputs)  # whoever finished last wrote the manifest
    assert shard_set(out) == shard_set(tree_train)
    assert temp_files(out) == []


def test_the_last_array_task_writes_the_manifest(quirk_tree, tree_train, tmp_path):
    out = tmp_path / "train"
    for i in range(3):
        result = shard_stage.run(quirk_tree, out, split="train", shard_size=8, workers=1, task_index=i,
                                 num_tasks=3)
        assert result.finished == (i == 2) and (out / "manifest.json").exists() == (i == 2)
        assert result.product.shards_done == [9, 18, 27][i]
    assert shard_set(out) == shard_set(tree_train)


@pytest.mark.slow
def test_a_run_without_task_flags_completes_a_partial_array_run(quirk_tree, tree_train, tmp_path):
    out = tmp_path / "train"
    for i in (0, 2):  # task 1 "failed"
        result = cli("shard", quirk_tree, out, "--split", "train", "--shard-size", "8", "--workers", "1",
                     "--task-index", i, "--num-tasks", "3")
        assert result.returncode == 0 and "manifest is written when all do" in result.stderr
    assert not (out / "manifest.json").exists()
    done = unit_files(out)
    assert len(done) == 2 * 18
    rerun = cli("shard", quirk_tree, out, "--split", "train", "--shard-size", "8", "--workers", "2")
    assert rerun.returncode == 0 and "18 of 27 shards already written, kept" in rerun.stderr
    assert {name: stat for name, stat in unit_files(out).items() if name in done} == done
    assert shard_set(out) == shard_set(tree_train)


def test_slurm_array_task_id_is_the_default_task_index(quirk_tree, tmp_path):
    out = tmp_path / "val"
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1"}
    result = cli("shard", quirk_tree, out, "--split", "val", "--shard-size", "16", "--workers", "1",
                 "--num-tasks", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == ["val-000002.tar", "val-000003.tar"]


@pytest.mark.slow
def test_the_key_covers_the_split_and_its_labels_but_not_the_other_split(quirk_tree, tmp_path):
    source = tmp_path / "imagenet"
    shutil.copytree(quirk_tree, source, symlinks=True)
    train, val = tmp_path / "shards" / "train", tmp_path / "shards" / "val"
    shard_stage.run(source, val, split="val", shard_size=16, workers=1)
    shard_stage.run(source, train, split="train", shard_size=64, workers=2)
    (source / "val" / f"{VAL_1}.JPEG").unlink()
    assert shard_stage.run(source, train, split="train", shard_size=64).up_to_date
    assert shard_stage.run(source, val, split="val", shard_size=16, workers=1).product.written == VAL_IMAGES - 1
    csv = source / "LOC_val_solution.csv"
    csv.write_text(csv.read_text().replace("ILSVRC2012_val_00000007,", "ILSVRC2012_val_00000007x,"))
    result = shard_stage.run(source, val, split="val", shard_size=16, workers=1)
    assert not result.up_to_date and result.product.written == VAL_IMAGES - 2  # val 7 lost its label


@pytest.mark.slow
def test_rerun_with_the_same_params_is_up_to_date_and_changes_nothing(quirk_tree, tmp_path):
    out = tmp_path / "val"
    assert cli("shard", quirk_tree, out, "--split", "val", "--shard-size", "16").returncode == 0
    before = snapshot(out)
    again = cli("shard", quirk_tree, out, "--split", "val", "--shard-size", "16", "--workers", "1")
    assert again.returncode == 0 and "up to date" in again.stderr
    assert snapshot(out) == before


def test_force_redoes_every_shard_with_the_same_bytes(tree_val, quirk_tree, tmp_path):
    out = tmp_path / "val"
    shutil.copytree(tree_val, out)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    result = shard_stage.run(quirk_tree, out, split="val", shard_size=16, workers=1, force=True)
    assert not result.up_to_date and result.finished and result.product.written == VAL_IMAGES
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) != before[p.name] for p in out.glob("*.tar"))
    assert shard_set(out) == shard_set(tree_val)


def test_changing_the_quality_makes_the_stage_stale_and_rewrites_every_shard(tree_val, quirk_tree, tmp_path):
    out = tmp_path / "val"
    shutil.copytree(tree_val, out)
    result = shard_stage.run(quirk_tree, out, split="val", shard_size=16, quality=80, workers=1)
    assert not result.up_to_date and result.product.written == VAL_IMAGES
    assert manifest(out)["params"]["quality"] == 80
    assert manifest(out)["bytes"] < 0.8 * manifest(tree_val)["bytes"]
    assert not set(shards_only(out).values()) & set(shards_only(tree_val).values())
    assert shard_stage.run(quirk_tree, out, split="val", shard_size=16, quality=80).up_to_date
    fewer = shard_stage.run(quirk_tree, out, split="val", shard_size=32, quality=80, workers=1)  # 2 shards now
    assert fewer.product.shards_total == 2 and sorted(p.name for p in out.glob("val-*")) == [
        "val-000000.idx", "val-000000.tar", "val-000001.idx", "val-000001.tar"]


# ---------------------------------------------------------------------------------------------------------------
# verify


def test_verify_passes_on_fresh_shards_and_decodes_every_image(tree_val):
    plain = cli("verify", tree_val)
    assert plain.returncode == 0 and "4 shards match the manifest" in plain.stderr
    decoded = cli("verify", tree_val, "--decode")
    assert decoded.returncode == 0 and "and decode" in decoded.stderr


def test_verify_catches_a_flipped_byte_and_names_the_shard(tree_val, tmp_path):
    out = tmp_path / "val"
    shutil.copytree(tree_val, out)
    data = bytearray((out / "val-000002.tar").read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / "val-000002.tar").write_bytes(bytes(data))
    result = cli("verify", out)
    assert result.returncode == 4 and "Traceback" not in result.stderr
    assert "val-000002.tar" in result.stderr and "val-000001.tar" not in result.stderr


def test_verify_catches_an_index_that_does_not_match_its_shard(tree_val, tmp_path):
    out = tmp_path / "val"
    shutil.copytree(tree_val, out)
    idx = (out / "val-000001.idx").read_text().splitlines()
    idx[1], idx[2] = idx[2], idx[1]
    (out / "val-000001.idx").write_text("\n".join(idx) + "\n")
    (out / "val-000003.idx").unlink()
    result = cli("verify", out)
    assert result.returncode == 4
    assert "val-000001.idx" in result.stderr and "val-000003.idx" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# the file system: nothing outside OUT, hostile archives, clear errors


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tree", "official"])
def test_nothing_is_written_outside_out(layout, quirk_tree, official, tmp_path):
    source = quirk_tree if layout == "tree" else official
    home, tmp, cwd = tmp_path / "home", tmp_path / "tmp", tmp_path / "cwd"
    for d in (home, tmp, cwd):
        d.mkdir()
    before_source, before_here = snapshot(source), snapshot(tmp_path)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache")}
    out = tmp_path / "shards" / "val"
    result = cli_process("shard", source, out, "--split", "val", "--shard-size", "16", "--workers", "2", env=env,
                         cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert snapshot(source) == before_source
    after = snapshot(tmp_path)
    new = {p for p in set(after) - set(before_here) if not p.startswith("shards/val/")}
    assert new == {"shards", "shards/val"}
    assert {p: after[p] for p in before_here} == before_here  # home, tmp and cwd untouched


def make_hostile_archives(root: Path, sample_dir: Path, meta: Path) -> Path:
    """Official-looking archives whose members try to escape: `..`, absolute paths, links, devices."""
    root.mkdir(parents=True)
    good = (sample_dir / "val" / "ILSVRC2012_val_00000007.JPEG").read_bytes()

    def add(tar: tarfile.TarFile, name: str, data: bytes = good, kind: bytes = tarfile.REGTYPE, link: str = ""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        add(val, "ILSVRC2012_val_00000001.JPEG")
        add(val, "../ILSVRC2012_val_00000002.JPEG")
        add(val, "/tmp/ILSVRC2012_val_00000003.JPEG")
        add(val, "ILSVRC2012_val_00000004.JPEG", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add(val, "ILSVRC2012_val_00000005.JPEG", kind=tarfile.LNKTYPE, link="ILSVRC2012_val_00000001.JPEG")
        add(val, "ILSVRC2012_val_00000006.JPEG", kind=tarfile.CHRTYPE)
        add(val, "sub/../../ILSVRC2012_val_00000007.JPEG")
    tench = (sample_dir / "train" / "n01440764" / "n01440764_tench.JPEG").read_bytes()
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode="w") as t:
            add(t, "n01440764_1.JPEG", tench)
            add(t, "../../n01440764_2.JPEG", tench)
            add(t, "n01440764_3.JPEG", kind=tarfile.SYMTYPE, link="../../../etc/passwd")
        add(outer, "n01440764.tar", inner.getvalue())
        add(outer, "../n01443537.tar", inner.getvalue())
    shutil.copy(meta / "LOC_val_solution.csv", root)
    return root


def test_unsafe_archive_members_are_ignored_with_a_warning_and_nothing_escapes(sample_dir, meta_dir, tmp_path):
    root = make_hostile_archives(tmp_path / "data" / "ilsvrc", sample_dir, meta_dir)
    before = snapshot(tmp_path)
    assert not Path("/tmp/ILSVRC2012_val_00000003.JPEG").exists()
    expected = {  # name → how its reason starts
        "val": {"../ILSVRC2012_val_00000002.JPEG": "unsafe path",
                "/tmp/ILSVRC2012_val_00000003.JPEG": "unsafe path",
                "ILSVRC2012_val_00000004.JPEG": "symbolic link to /etc/passwd",
                "ILSVRC2012_val_00000005.JPEG": "hard link to ILSVRC2012_val_00000001.JPEG",
                "ILSVRC2012_val_00000006.JPEG": "device file",
                "sub/../../ILSVRC2012_val_00000007.JPEG": "unsafe path"},
        "train": {"n01440764.tar/../../n01440764_2.JPEG": "unsafe path",
                  "n01440764.tar/n01440764_3.JPEG": "symbolic link to ../../../etc/passwd",
                  "../n01443537.tar": "unsafe path"},
    }
    for split, keys in (("val", ["ILSVRC2012_val_00000001"]), ("train", ["n01440764_1"])):
        out = tmp_path / "out" / split
        result = cli("shard", root, out, "--split", split)
        assert result.returncode == 0, result.stderr
        assert sorted(samples(out)) == keys
        ignored = {i["name"]: i["reason"] for i in manifest(out)["ignored_members"]}
        assert set(ignored) == set(expected[split])
        for name, reason in expected[split].items():
            assert ignored[name].startswith(reason)
            assert f"warning: ignored {name}: {reason}" in result.stderr
    assert not Path("/tmp/ILSVRC2012_val_00000003.JPEG").exists()
    assert {p for p in set(snapshot(tmp_path)) - set(before) if not p.startswith("out")} == set()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(("n01440764_", "ILSVRC2012_val_"))]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_source_that_matches_no_layout_is_one_clear_line(tmp_path):
    source = tmp_path / "downloads"
    (source / "misc").mkdir(parents=True)
    (source / "README.txt").write_text("not ImageNet")
    for split in ("train", "val"):
        line = one_line_error(cli("shard", source, tmp_path / "out", "--split", split))
        assert f"{source}: no ImageNet {split} split found" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_val_folder_without_labels_is_one_clear_line(quirk_tree, tmp_path):
    folder = tmp_path / "images" / "val"
    shutil.copytree(quirk_tree / "val", folder)
    line = one_line_error(cli("shard", folder, tmp_path / "out", "--split", "val"))
    assert "val labels not found" in line and "--labels" in line and str(folder) in line
    line = one_line_error(cli("shard", tmp_path / "images", tmp_path / "out", "--split", "val"))
    assert "val labels not found" in line
    line = one_line_error(cli("shard", folder, tmp_path / "out", "--split", "val", "--labels", tmp_path / "no.csv"))
    assert f"labels file not found: {tmp_path / 'no.csv'}" in line
    assert not (tmp_path / "out").exists()


def test_a_compressed_archive_is_one_clear_line(quirk_tree, meta_dir, tmp_path):
    archive = tmp_path / "val.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(quirk_tree / "val" / "ILSVRC2012_val_00000001.JPEG", arcname="ILSVRC2012_val_00000001.JPEG")
    line = one_line_error(cli("shard", archive, tmp_path / "out", "--split", "val",
                              "--labels", meta_dir / "LOC_val_solution.csv"))
    assert str(archive) in line and "compressed" in line


SPLITS = ("train", "val")


def indexed_samples(shard_dir: Path) -> list[tuple[str, bytes, int]]:
    """(key, jpg bytes, label) of every sample, in reading order, from the byte ranges of the DALI index files."""
    reader = SampleReader(sample_index(ShardSet.open(shard_dir)))
    return [(key, *reader.read(i)) for i, key in enumerate(reader.index.keys)]


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


@pytest.mark.slow
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

