"""The embedded default data set (pipeline/synth/): real files, read back the way ImageNet's are."""

from __future__ import annotations

import csv
import hashlib
import io
import statistics
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from pipeline import synth
from pipeline.errors import PipeError
from pipeline.sources import devkit_id_to_wnid, ilsvrc2012_classes, list_source
from pipeline.synth.archives import TAR_MTIME
from pipeline.synth.drawing import class_family, render_file
from pipeline.synth.plan import QUIRKS, ImageSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = {"classes": 3, "train_per_class": 4, "val_per_class": 2}


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _make(tmp_path_factory, name: str, **kwargs) -> Path:
    out = tmp_path_factory.mktemp(name)
    synth.generate(out, **{**TINY, **kwargs})
    return out


@pytest.fixture(scope="session")
def meta(meta_dir) -> Path:
    """The official ILSVRC-2012 metadata (shared/data/imagenet-meta)."""
    return meta_dir


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _make(tmp_path_factory, "tree")


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    return _make(tmp_path_factory, "tars", fmt="tars")


def _val_rows(root: Path) -> list[list[str]]:
    with open(root / "LOC_val_solution.csv", newline="") as f:
        return list(csv.reader(f))


def _val_labels(root: Path) -> dict[str, str]:
    return {image_id: prediction.split()[0] for image_id, prediction in _val_rows(root)[1:]}


def _sniff_kind(data: bytes) -> str:
    """What a file really is, from its bytes: png, or a JPEG's colour mode (rgb, grayscale, cmyk)."""
    image = Image.open(io.BytesIO(data))
    if data.startswith(PNG_SIGNATURE):
        assert image.format == "PNG" and image.mode in ("RGBA", "RGB")
        return "png"
    assert data[:3] == b"\xff\xd8\xff" and image.format == "JPEG"
    return {"CMYK": "cmyk", "L": "grayscale", "RGB": "rgb"}[image.mode]


def _train_members(train_tar: Path) -> dict[str, tuple[int, int]]:
    """Inner image name → (offset, size) of its bytes in the OUTER train tar."""
    members = {}
    with tarfile.open(train_tar) as outer:
        for m in outer:
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                for im in inner:
                    members[f"{m.name}/{im.name}"] = (m.offset_data + im.offset_data, im.size)
    return members


def _devkit_files(devkit: Path) -> dict[str, bytes]:
    with tarfile.open(devkit, "r:gz") as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile()}


# ------------------------------------------------------------------------------------------------------------
# determinism


@pytest.mark.slow
def test_same_seed_gives_byte_identical_tree_and_tars(tmp_path_factory, tree, tars):
    assert _digests(_make(tmp_path_factory, "tree-again")) == _digests(tree)
    assert _digests(_make(tmp_path_factory, "tars-again", fmt="tars")) == _digests(tars)


@pytest.mark.slow
def test_different_seed_changes_the_bytes_of_every_image(tmp_path_factory, tree):
    other = _digests(_make(tmp_path_factory, "tree-seed1", seed=1))
    mine = _digests(tree)
    assert other.keys() == mine.keys()
    images = [name for name in mine if name.endswith(".JPEG")]
    assert all(other[name] != mine[name] for name in images)


def test_any_image_renders_alone_to_the_bytes_written(tree):
    """Each image has its own generator (seed, split, label, index): no dependence on order or neighbours."""
    wnids = ilsvrc2012_classes().wnids
    for label, index in ((2, 3), (0, 0), (1, 2)):
        written = (tree / "train" / wnids[label] / f"{wnids[label]}_{index + 1}.JPEG").read_bytes()
        spec = ImageSpec(0, "train", label, index, index + 1, _sniff_kind(written))
        assert render_file(spec)[0] == written


# ------------------------------------------------------------------------------------------------------------
# tree layout and labels


def test_tree_layout_names_and_counts_follow_ilsvrc(tree):
    wnids = ilsvrc2012_classes().wnids[:3]
    expected = {"LOC_val_solution.csv", "LOC_synset_mapping.txt"}
    expected |= {f"train/{w}/{w}_{n}.JPEG" for w in wnids for n in range(1, 5)}
    expected |= {f"val/ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 7)}
    assert set(_digests(tree)) == expected
    assert synth.synth_image_count(**TINY) == 3 * (4 + 2)


def test_synset_mapping_is_the_first_n_official_lines(tree, meta):
    official = (meta / "LOC_synset_mapping.txt").read_text().splitlines(keepends=True)
    assert (tree / "LOC_synset_mapping.txt").read_text() == "".join(official[:3])


def test_val_csv_is_kaggle_format_with_each_class_val_per_class_times(tree):
    rows = _val_rows(tree)
    assert rows[0] == ["ImageId", "PredictionString"]
    assert [r[0] for r in rows[1:]] == [f"ILSVRC2012_val_{n:08d}" for n in range(1, 7)]
    wnids = [r[1].split()[0] for r in rows[1:]]
    assert sorted(wnids) == sorted(ilsvrc2012_classes().wnids[:3] * 2)
    for image_id, prediction in rows[1:]:
        assert prediction.endswith(" ")
        xmin, ymin, xmax, ymax = map(int, prediction.split()[1:])
        width, height = Image.open(tree / "val" / f"{image_id}.JPEG").size
        assert 0 <= xmin < xmax < width and 0 <= ymin < ymax < height


@pytest.mark.slow
def test_val_csv_label_is_the_class_whose_family_was_drawn(tree):
    """Regenerating the file from the CSV's class (and no other) gives its bytes and its box."""
    wnids = ilsvrc2012_classes().wnids[:3]
    for image_id, prediction in _val_rows(tree)[1:]:
        wnid, *box = prediction.split()
        number = int(image_id.rsplit("_", 1)[1])
        written = (tree / "val" / f"{image_id}.JPEG").read_bytes()
        kind = _sniff_kind(written)
        matches = {(label, index) for label in range(3) for index in range(2)
                   if render_file(ImageSpec(0, "val", label, index, number, kind))
                   == (written, tuple(map(int, box)))}
        assert len(matches) == 1 and wnids[matches.pop()[0]] == wnid


def test_the_project_reader_lists_the_tree_with_its_labels(tree):
    csv_labels = _val_labels(tree)
    val = list_source(tree, "val")
    assert {m.key: m.wnid for m in val.members} == csv_labels and not val.ignored
    train = list_source(tree, "train")
    assert len(train.members) == 12 and all(m.key.startswith(m.wnid + "_") for m in train.members)


# ------------------------------------------------------------------------------------------------------------
# the official archives


def test_tars_are_the_three_official_archives_holding_the_tree_bytes(tree, tars):
    assert sorted(p.name for p in tars.iterdir()) == sorted(
        ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"])
    with open(tars / "ILSVRC2012_img_train.tar", "rb") as f:
        for name, (offset, size) in _train_members(tars / "ILSVRC2012_img_train.tar").items():
            wnid_tar, image = name.split("/")
            f.seek(offset)
            assert f.read(size) == (tree / "train" / wnid_tar[:-4] / image).read_bytes()
    with tarfile.open(tars / "ILSVRC2012_img_val.tar") as val:
        names = val.getnames()
        assert names == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 7)]
        for name in names:
            assert val.extractfile(name).read() == (tree / "val" / name).read_bytes()


def test_train_tar_nests_one_uncompressed_tar_per_class(tars):
    wnids = ilsvrc2012_classes().wnids[:3]
    with tarfile.open(tars / "ILSVRC2012_img_train.tar") as outer:
        assert outer.getnames() == [f"{w}.tar" for w in wnids]
        for m, wnid in zip(outer.getmembers(), wnids, strict=True):
            head = outer.extractfile(m).read(512)
            assert head[257:262] == b"ustar"  # a plain tar header, not gzip
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                assert inner.getnames() == [f"{wnid}_{n}.JPEG" for n in range(1, 5)]
                headers = {(i.uid, i.gid, i.uname, i.mtime, i.mode) for i in inner}
                assert headers == {(0, 0, "", TAR_MTIME, 0o644)}


def test_devkit_ground_truth_holds_devkit_ids_of_the_csv_wnids(tree, tars):
    devkit = tars / "ILSVRC2012_devkit_t12.tar.gz"
    assert devkit.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0
    files = _devkit_files(devkit)
    assert set(files) == {"ILSVRC2012_devkit_t12/data/meta.mat",
                          "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"}
    ids = [int(line) for line in files["ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"]
           .decode().splitlines()]
    assert [devkit_id_to_wnid()[i] for i in ids] == list(_val_labels(tree).values())
    assert ids != [ilsvrc2012_classes().label_of(devkit_id_to_wnid()[i]) for i in ids]  # not sorted indices


def test_meta_mat_reads_like_the_real_devkit_meta_mat(tars, meta):
    mine = loadmat(io.BytesIO(_devkit_files(tars / "ILSVRC2012_devkit_t12.tar.gz")[
        "ILSVRC2012_devkit_t12/data/meta.mat"]), squeeze_me=True)
    real = loadmat(meta / "meta.mat", squeeze_me=True)
    assert mine["synsets"].dtype.names == real["synsets"].dtype.names
    real_pairs = {i: w for i, w in zip(real["synsets"]["ILSVRC2012_ID"], real["synsets"]["WNID"], strict=True)
                  if i <= 1000}
    my_pairs = dict(zip(mine["synsets"]["ILSVRC2012_ID"], mine["synsets"]["WNID"], strict=True))
    assert my_pairs == real_pairs
    assert all(type(i) is int for i in my_pairs) and all(isinstance(w, str) for w in my_pairs.values())
    real_words = dict(zip(real["synsets"]["WNID"], real["synsets"]["words"], strict=True))
    assert all(real_words[w] == words for w, words in zip(mine["synsets"]["WNID"], mine["synsets"]["words"],
                                                           strict=True))
    assert b"Created on" not in mine["__header__"]


def test_the_project_reader_lists_the_tars_with_devkit_labels(tree, tars):
    val = list_source(tars, "val")
    assert {m.key: m.wnid for m in val.members} == _val_labels(tree)
    train = list_source(tars, "train")
    assert sorted(m.key for m in train.members) == sorted(
        p.stem for p in (tree / "train").rglob("*.JPEG"))


# ------------------------------------------------------------------------------------------------------------
# ImageNet's odd files


@pytest.mark.parametrize("split", ["train", "val"])
def test_each_split_holds_one_png_one_cmyk_and_one_grayscale_file_named_jpeg(tree, split):
    files = sorted((tree / split).rglob("*.JPEG"))
    kinds = [_sniff_kind(path.read_bytes()) for path in files]
    assert sorted(kinds) == sorted(["png", "cmyk", "grayscale"] + ["rgb"] * (len(files) - 3))


@pytest.mark.slow
def test_summary_names_the_quirk_files_and_counts(tmp_path, tree):
    summary = synth.generate(tmp_path, **TINY)
    assert _digests(tmp_path) == _digests(tree)
    assert summary.images == 18 and summary.train_images == 12 and summary.val_images == 6
    assert summary.wnids == tuple(ilsvrc2012_classes().wnids[:3])
    for split in ("train", "val"):
        assert set(summary.quirk_files[split]) == set(QUIRKS)
        for kind, name in summary.quirk_files[split].items():
            assert _sniff_kind(next((tmp_path / split).rglob(name)).read_bytes()) == kind
    assert sorted(summary.quirks) == sorted(n for s in summary.quirk_files.values() for n in s.values())


# ------------------------------------------------------------------------------------------------------------
# images


@pytest.mark.slow
def test_default_image_sizes_spread_like_imagenet(tmp_path):
    synth.generate(tmp_path, classes=5, train_per_class=40, val_per_class=4)
    sizes = [Image.open(p).size for p in tmp_path.rglob("*.JPEG")]
    assert len(sizes) == 220
    assert all(150 <= min(w, h) <= 800 for w, h in sizes)
    assert statistics.median(max(w, h) for w, h in sizes) == 500
    assert 333 <= statistics.median(min(w, h) for w, h in sizes) <= 375
    assert sum(w > h for w, h in sizes) > 0.55 * len(sizes)
    assert sum(w < h for w, h in sizes) > 0.05 * len(sizes) and sum(w == h for w, h in sizes) > 0
    assert 1.3 <= statistics.median(w / h for w, h in sizes) <= 1.51


@pytest.mark.slow
def test_class_signal_survives_the_central_crop(tmp_path):
    """A nearest-centroid classifier on tiny thumbnails of the central 224/256 square beats chance by far: the
    object is near the centre and its palette dominates, so a CNN has something to learn."""
    synth.generate(tmp_path, classes=10, train_per_class=20, val_per_class=6)

    def thumb(path: Path) -> np.ndarray:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        side = min(w, h) * 224 / 256
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return np.asarray(image.resize((8, 8), Image.BILINEAR, box=box), np.float32).ravel()

    wnids = ilsvrc2012_classes().wnids[:10]
    centroids = np.stack([np.mean([thumb(p) for p in (tmp_path / "train" / w).iterdir()], axis=0)
                          for w in wnids])
    labels = _val_labels(tmp_path)
    hits = [wnids[int(np.argmin(((centroids - thumb(tmp_path / "val" / f"{k}.JPEG")) ** 2).sum(1)))] == w
            for k, w in labels.items()]
    assert np.mean(hits) >= 0.3  # chance is 0.1


def test_class_families_differ_for_the_first_classes():
    families = [class_family(label) for label in range(12)]
    assert len({f.shape for f in families}) == 12
    hues = sorted(f.hue for f in families[:10])
    assert min(b - a for a, b in zip(hues, hues[1:], strict=False)) > 0.05


# ------------------------------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"classes": 0}, "classes must be an integer in 1..1000"),
    ({"classes": 1001}, "classes must be an integer in 1..1000"),
    ({"train_per_class": 0}, "train_per_class must be an integer >= 1"),
    ({"val_per_class": 0}, "val_per_class must be an integer >= 1"),
    ({"fmt": "zip"}, "unknown synth format 'zip'"),
    ({"seed": -1}, "seed must be an integer in 0..2"),
])
def test_bad_arguments_raise_a_pipe_error_saying_what_was_expected(tmp_path, kwargs, message):
    with pytest.raises(PipeError, match=message):
        synth.generate(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_generate_refuses_a_missing_or_non_empty_folder(tmp_path):
    with pytest.raises(PipeError, match="expected an existing empty folder"):
        synth.generate(tmp_path / "missing", **TINY)
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(PipeError, match="not empty"):
        synth.generate(tmp_path, **TINY)


@pytest.mark.slow
def test_progress_reports_every_image_once(tmp_path):
    seen = []
    synth.generate(tmp_path, **TINY, fmt="tars", progress=seen.append)
    assert sum(seen) == synth.synth_image_count(**TINY) == 18


def test_a_split_smaller_than_three_images_holds_as_many_odd_files_as_fit(tmp_path):
    summary = synth.generate(tmp_path, classes=1, train_per_class=2, val_per_class=1)
    assert {split: sorted(files) for split, files in summary.quirk_files.items()} == {
        "train": ["cmyk", "grayscale"], "val": ["grayscale"]}
    kinds = sorted(_sniff_kind(p.read_bytes()) for p in tmp_path.rglob("*.JPEG"))
    assert kinds == ["cmyk", "grayscale", "grayscale"]
