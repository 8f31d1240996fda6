"""Augmentation: real DALI CPU pipelines and the torch reference path on real shards and on shards of made-up
images whose pixels say where they came from (coordinate ramps, flat grey), written by the real shard writer."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_SIZE
from PIL import Image
from scipy import stats

from pipeline.augment import (
    TEN_CROP_VIEWS,
    EvalLoader,
    ReferenceEvalLoader,
    ReferenceTrainLoader,
    TrainLoader,
    centre_crop_box,
    centre_square,
    epoch_order,
    lighting_offset,
    make_eval_loader,
    make_train_loader,
    rank_range,
    ten_crop_boxes,
)
from pipeline.engine import write_json
from pipeline.errors import PipeError
from pipeline.preview import augmented_samples, preview_grid
from pipeline.records import LoaderPosition, Pca, ShardIndex
from pipeline.shards import build_manifest, shard_name, write_shard
from pipeline.sources import Member, ilsvrc2012_classes

LOADERS = ("dali", "torch")
# ImageNet's published RGB statistics in [0, 1] units (eigenvectors as columns, largest component positive)
MEAN = [0.485, 0.456, 0.406]
EIGVALS = [0.2175, 0.0188, 0.0045]
EIGVECS = [[0.5675, 0.7192, -0.4009], [0.5808, -0.0045, 0.8140], [0.5836, -0.6948, -0.4203]]
# 150 distinct labels of 1, 2 and 3 digits: they double as sample ids
PATTERN_LABELS = list(range(100)) + list(range(100, 1000, 18))[:50]
PATTERN_SIZES = ((256, 256), (300, 256), (256, 300))  # (width, height): square, landscape, portrait
GREY = 128


def pca_dict() -> dict:
    v, lam = np.array(EIGVECS), np.array(EIGVALS)
    return {"pixel_scale": "0-1", "pixels": 1, "images": 1, "mean": MEAN, "std": [0.229, 0.224, 0.225],
            "cov": (v * lam @ v.T).tolist(), "eigvals": EIGVALS, "eigvecs": EIGVECS, "source_manifest_sha256": "0"}


@pytest.fixture(scope="module")
def pca() -> Pca:
    return Pca.from_json(pca_dict())


def write_shard_set(out: Path, images: list[tuple[int, Image.Image]], shard_size: int, split: str = "train",
                    label_of_wnid: dict[str, int] | None = None) -> Path:
    """Shards + DALI indexes + manifest by the real shard writer, from lossless PNG sources."""
    classes = ilsvrc2012_classes()
    src = out.parent / f"{out.name}-src"
    members = []
    for i, (label, img) in enumerate(images):
        wnid = classes.wnids[label % 1000]
        path = src / wnid / f"{wnid}_{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        members.append(Member(f"{wnid}_{i:05d}", wnid, str(path.relative_to(src))))
    labels = label_of_wnid or {classes.wnids[label]: label for label, _ in images}
    records = [write_shard(out, shard_name(split, k), members[start:start + shard_size], src, labels,
                           short_side=256, quality=95)
               for k, start in enumerate(range(0, len(members), shard_size))]
    params = {"split": split, "shard_size": shard_size, "short_side": 256, "quality": 95, "seed": 0,
              "classes": "ilsvrc2012"}
    index = ShardIndex(str(src), len(records), tuple(r.samples for r in records), len(members),
                       tuple(sorted(set(labels))), ())
    write_json(out / "manifest.json", build_manifest(split, records, classes, index, params).to_json())
    return out


def coordinate_image(width: int, height: int) -> Image.Image:
    """Inside the central square, R = x and G = y in square coordinates (smooth ramps survive JPEG); B flat."""
    left, top, _ = centre_square(width, height)
    x = np.clip(np.arange(width) - left, 0, 255)
    y = np.clip(np.arange(height) - top, 0, 255)
    rgb = np.stack([np.broadcast_to(x[None, :], (height, width)), np.broadcast_to(y[:, None], (height, width)),
                    np.full((height, width), 64)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def pattern_shards(tmp_path_factory) -> Path:
    """150 coordinate images (square, landscape, portrait), each with its own label, in shards of 40/40/40/30."""
    images = [(label, coordinate_image(*PATTERN_SIZES[i % 3])) for i, label in enumerate(PATTERN_LABELS)]
    return write_shard_set(tmp_path_factory.mktemp("pattern") / "train", images, shard_size=40)


@pytest.fixture(scope="module")
def grey_shards(tmp_path_factory) -> Path:
    """256 flat grey 256×256 images: what comes out minus the grey minus the mean is the lighting offset."""
    images = [(7, Image.new("RGB", (256, 256), (GREY,) * 3))] * 256
    return write_shard_set(tmp_path_factory.mktemp("grey") / "train", images, shard_size=128)


def read_back_crop(patch: torch.Tensor) -> tuple[int, int, bool, float]:
    """(dx, dy, mirrored, worst pixel error) of a patch of a coordinate image, in central-square coordinates."""
    crop = patch.shape[-1]
    r, g = (patch[0] + 255 * MEAN[0]).double(), (patch[1] + 255 * MEAN[1]).double()
    j = torch.arange(crop, dtype=torch.float64)
    mirrored = bool((r[:, -1] - r[:, 0]).mean() < 0)
    columns = (crop - 1 - j) if mirrored else j
    dx, dy = (r - columns[None, :]).mean().item(), (g - j[:, None]).mean().item()
    error = max((r - columns[None, :] - round(dx)).abs().max().item(), (g - j[:, None] - round(dy)).abs().max().item())
    return round(dx), round(dy), mirrored, error


def train_loader(kind: str, shard_dir: Path, pca: dict, batch_size: int, **options):
    """DALI with 2 threads, or the reference in the test process (no worker start-up)."""
    return make_train_loader(shard_dir, pca, batch_size, loader=kind, num_threads=2 if kind == "dali" else 0,
                             **options)


def epoch(loader, number: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(number)
    return list(loader)


def tar_labels(shard_dir: Path) -> list[int]:
    """`cls` of every sample, read with tarfile, in manifest and tar order."""
    out = []
    for entry in json.loads((shard_dir / "manifest.json").read_text())["shards"]:
        with tarfile.open(shard_dir / entry["name"]) as tar:
            out += [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]
    return out


# ---------------------------------------------------------------------------------------------------------------
# pca.json and the pure math


def test_pca_json_is_read_with_exactly_its_fields_and_missing_or_malformed_ones_are_refused(tmp_path):
    path = tmp_path / "pca.json"
    path.write_text(json.dumps({**pca_dict(), "extra": 1}))
    assert Pca.read(path) == Pca.from_json(pca_dict())
    with pytest.raises(PipeError, match="no such file"):
        Pca.read(tmp_path / "absent.json")
    path.write_text("{not json")
    with pytest.raises(PipeError, match="not readable as JSON"):
        Pca.read(path)
    path.write_text(json.dumps({k: v for k, v in pca_dict().items() if k != "eigvecs"}))
    with pytest.raises(PipeError, match="missing field.*eigvecs"):
        Pca.read(path)
    path.write_text(json.dumps({**pca_dict(), "eigvals": [0.1, 0.2]}))
    with pytest.raises(PipeError, match="eigvals as 3 finite numbers"):
        Pca.read(path)
    path.write_text(json.dumps({**pca_dict(), "eigvals": [0.0045, 0.0188, 0.2175]}))
    with pytest.raises(PipeError, match="descending"):
        Pca.read(path)


def test_crop_boxes_are_the_centre_and_corners_of_the_central_square():
    assert centre_square(341, 256) == (42, 0, 256) and centre_square(256, 300) == (0, 22, 256)
    assert centre_crop_box(341, 256, 224) == (58, 16, 282, 240)
    assert centre_crop_box(256, 256, 227) == (14, 14, 241, 241)
    boxes = ten_crop_boxes(341, 256, 224)
    assert len(boxes) == len(TEN_CROP_VIEWS) == 10
    assert [b for b, _ in boxes[:5]] == [(42, 0, 266, 224), (74, 0, 298, 224), (42, 32, 266, 256),
                                         (74, 32, 298, 256), (58, 16, 282, 240)]
    assert [b for b, _ in boxes[5:]] == [b for b, _ in boxes[:5]]
    assert [m for _, m in boxes] == [False] * 5 + [True] * 5


def test_lighting_offset_is_255_eigvecs_times_alpha_times_eigvals_in_numpy_and_torch():
    alpha = np.array([0.1, -0.2, 0.05])
    expected = 255 * sum(alpha[i] * EIGVALS[i] * np.array(EIGVECS)[:, i] for i in range(3))
    assert np.allclose(lighting_offset(alpha, EIGVALS, EIGVECS), expected, atol=1e-12)
    assert torch.allclose(lighting_offset(torch.tensor(alpha), EIGVALS, EIGVECS), torch.tensor(expected), atol=1e-12)


def test_rank_ranges_split_the_samples_into_disjoint_complete_parts():
    for n, world in ((210, 1), (210, 2), (150, 3), (7, 4)):
        parts = [rank_range(n, r, world) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))


# ---------------------------------------------------------------------------------------------------------------
# labels


@pytest.mark.slow
def test_labels_parsed_in_the_pipeline_equal_the_cls_text_of_1_2_and_3_digits(sample_shards, pca):
    expected = tar_labels(sample_shards["train"])
    assert {len(str(label)) for label in expected} == {1, 2, 3}
    for kind in LOADERS:
        loader = make_eval_loader(sample_shards["train"], pca, 32, loader=kind, num_threads=2)
        assert torch.cat([labels for _, labels in loader]).tolist() == expected
        assert all(labels.dtype == torch.int64 for _, labels in loader)


def test_a_cls_longer_than_the_class_list_allows_stops_with_an_error(tmp_path, pca):
    wnid = ilsvrc2012_classes().wnids[3]
    shards = write_shard_set(tmp_path / "bad", [(3, Image.new("RGB", (256, 256)))] * 4, shard_size=4,
                             label_of_wnid={wnid: 1234})
    with pytest.raises(PipeError, match="not a label in 0..999"):
        list(EvalLoader(shards, pca, 4, num_threads=1))


# ---------------------------------------------------------------------------------------------------------------
# determinism, epochs, ranks, resume


@pytest.mark.slow
def test_same_seed_gives_identical_batches_whatever_the_thread_count_and_epochs_and_seeds_differ(pattern_shards,
                                                                                                 pca):
    first = epoch(TrainLoader(pattern_shards, pca, 25, seed=3, num_threads=2), 0)
    again = epoch(TrainLoader(pattern_shards, pca, 25, seed=3, num_threads=1), 0)
    assert len(first) == 6
    for (a, la), (b, lb) in zip(first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    held, copies = [], []
    loader = TrainLoader(pattern_shards, pca, 25, seed=3, num_threads=2)
    for images, _ in loader:  # on the CPU a batch shares DALI's buffer: later batches must not overwrite it
        held.append(images)
        copies.append(images.clone())
    assert all(torch.equal(h, c) for h, c in zip(held, copies, strict=True))
    assert all(torch.equal(h, f) for h, (f, _) in zip(held, first, strict=True))
    order = torch.cat([labels for _, labels in first]).tolist()
    next_epoch = torch.cat([labels for _, labels in epoch(TrainLoader(pattern_shards, pca, 25, seed=3), 1)]).tolist()
    other_seed = torch.cat([labels for _, labels in epoch(TrainLoader(pattern_shards, pca, 25, seed=4), 0)]).tolist()
    assert sorted(order) == sorted(next_epoch) == sorted(PATTERN_LABELS)  # 150 = 6 × 25: nothing dropped
    assert order != next_epoch and order != other_seed


def global_batches(kind: str, shard_dir: Path, pca, global_batch: int, world_size: int, number: int, **options):
    """Epoch `number` read by `world_size` ranks, each rank's slices put back together per global batch."""
    ranks = [epoch(train_loader(kind, shard_dir, pca, global_batch // world_size, rank=rank, world_size=world_size,
                                **options), number) for rank in range(world_size)]
    assert len({len(batches) for batches in ranks}) == 1  # every rank the same number of steps
    return [(torch.cat([r[b][0] for r in ranks]), torch.cat([r[b][1] for r in ranks])) for b in range(len(ranks[0]))]


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOADERS)
def test_the_global_batches_are_the_epochs_computed_order_whatever_the_number_of_ranks(pattern_shards, pca, kind):
    """Epoch e is a seeded permutation of all 150 samples; global batch b is its samples [16b, 16b + 16); one, two
    or four ranks read it as the same images, each its slice, with the same crops, flips and lighting."""
    for number in (0, 1):
        order = [PATTERN_LABELS[i] for i in epoch_order(150, 0, number)]
        one = global_batches(kind, pattern_shards, pca, 16, 1, number)
        assert len(one) == 150 // 16
        assert torch.cat([labels for _, labels in one]).tolist() == order[:144]  # the tail of 6 dropped
        for world_size in (2, 4):
            for (a, la), (b, lb) in zip(one, global_batches(kind, pattern_shards, pca, 16, world_size, number),
                                        strict=True):
                assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(256, 224), SMALL_SIZE], ids=lambda s: f"{s[0]}-{s[1]}")
def test_the_dali_loader_and_the_torch_reference_give_the_same_training_batches_pixel_for_pixel(
        sample_shards, small_sample_shards, pca, size):
    """The draws are computed, not DALI's: its window decode, flip and lighting equal Pillow's crop, flip and
    subtraction exactly, batch after batch (and in a channels-last layout), at the paper's size and a smaller one."""
    shards, crop = (sample_shards if size[0] == 256 else small_sample_shards)["train"], size[1]
    dali = epoch(train_loader("dali", shards, pca, 10, seed=1, crop=crop), 0)
    reference = epoch(train_loader("torch", shards, pca, 10, seed=1, crop=crop), 0)
    assert len(dali) == len(reference) == 21
    for (a, la), (b, lb) in zip(dali, reference, strict=True):
        assert a.shape == (10, 3, crop, crop) and a.dtype == torch.float32 and la.dtype == torch.int64
        assert torch.equal(la, lb) and torch.equal(a, b), f"max |Δ| {(a - b).abs().max().item()}"
    for kind in LOADERS:
        first = next(iter(train_loader(kind, shards, pca, 10, seed=1, crop=crop, channels_last=True)))[0]
        assert first.is_contiguous(memory_format=torch.channels_last) and torch.equal(first, dali[0][0])
    assert sorted(torch.cat([y for _, y in dali]).tolist()) == sorted(tar_labels(shards))


@pytest.mark.slow
def test_dali_worker_processes_read_the_same_batches_as_the_training_process(pattern_shards, pca):
    serial = epoch(TrainLoader(pattern_shards, pca, 25, seed=2, num_threads=2), 1)
    parallel = epoch(TrainLoader(pattern_shards, pca, 25, seed=2, num_threads=2, workers=2), 1)
    for (a, la), (b, lb) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOADERS)
def test_resuming_mid_epoch_reads_nothing_it_consumed_and_yields_exactly_the_remaining_batches(pattern_shards, pca,
                                                                                               kind, tmp_path):
    """The state is (epoch, global batches consumed): a resume starts reading at the next batch. Proved on shards
    whose consumed samples are overwritten with zeros (the same sizes): reading one of them would fail."""
    uninterrupted = epoch(train_loader(kind, pattern_shards, pca, 10, seed=5), 2)
    first = train_loader(kind, pattern_shards, pca, 10, seed=5)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(4):
        next(it)
    torch.save({"loader": first.state_dict().to_json()}, tmp_path / "ckpt.pt")  # as a checkpoint keeps it
    state = LoaderPosition.from_json(torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"])
    assert state == LoaderPosition(epoch=2, batches=4)

    shards = tmp_path / "shards"
    shutil.copytree(pattern_shards, shards)
    source = first.source(2)
    for i in np.concatenate([source.positions(b) for b in range(4)]):  # the 40 samples consumed
        tar = Path(source.index.tars[source.index.shard[i]])
        with open(shards / tar.name, "r+b") as f:
            f.seek(int(source.index.jpg_offset[i]))
            f.write(bytes(int(source.index.jpg_size[i])))
    resumed = train_loader(kind, shards, pca, 10, seed=5)
    resumed.set_epoch(2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(uninterrupted) - 4 == 11
    for (a, la), (b, lb) in zip(rest, uninterrupted[4:], strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert resumed.state_dict() == LoaderPosition(2, 15)


@pytest.mark.slow
@pytest.mark.parametrize("world_size,batch_size", [(1, 10), (1, 7), (2, 10), (2, 7), (3, 10), (3, 7)])
def test_eval_reads_every_sample_exactly_once_for_any_batch_size_and_rank_count(pattern_shards, pca, world_size,
                                                                                batch_size):
    for kind in LOADERS if (world_size, batch_size) in ((2, 7), (3, 10)) else ("dali",):
        labels = []
        for rank in range(world_size):
            loader = make_eval_loader(pattern_shards, pca, batch_size, rank=rank, world_size=world_size,
                                      loader=kind, num_threads=2 if kind == "dali" else 0)
            batches = list(loader)
            assert len(batches) == len(loader)
            assert all(len(images) == len(lb) for images, lb in batches)
            labels += torch.cat([lb for _, lb in batches]).tolist()
        assert labels == PATTERN_LABELS  # each once, in shard order


# ---------------------------------------------------------------------------------------------------------------
# what the pixels show: crops, mirror, lighting


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOADERS)
def test_crops_lie_in_the_central_square_at_uniform_offsets_and_half_are_mirrored(pattern_shards, pca, kind):
    loader = train_loader(kind, pattern_shards, pca, 50, lighting=False)
    draws = [read_back_crop(image) for number in range(7) for images, _ in epoch(loader, number) for image in images]
    n = len(draws)
    assert n == 1050
    # every pixel is on the fitted ramp (JPEG q95 error measured ≤ 3): an unscaled patch inside the square
    assert max(error for *_, error in draws) <= 5
    dx, dy = np.array([d[0] for d in draws]), np.array([d[1] for d in draws])
    assert dx.min() == dy.min() == 0 and dx.max() == dy.max() == 32  # every offset 0..32 occurs …
    for offsets in (dx, dy):  # … equally often: chi-square over 33 bins, p > 0.001
        assert stats.chisquare(np.bincount(offsets, minlength=33)).pvalue > 1e-3
    # the end offsets too (rounding u·32 would give 0 and 32 half the weight; chi-square alone misses that)
    ends = int(np.isin(dx, (0, 32)).sum() + np.isin(dy, (0, 32)).sum())
    assert stats.binomtest(ends, 2 * n, 2 / 33).pvalue > 1e-3
    mirrored = sum(d[2] for d in draws)
    assert stats.binomtest(mirrored, n, 0.5).pvalue > 1e-3  # the mirror rate is consistent with 0.5


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOADERS)
def test_random_crop_and_mirror_off_give_the_unflipped_centre_patch_every_time(pattern_shards, pca, kind):
    loader = train_loader(kind, pattern_shards, pca, 50, lighting=False, random_crop=False, mirror=False)
    draws = [read_back_crop(image) for number in range(2) for images, _ in epoch(loader, number) for image in images]
    assert len(draws) == 300
    assert {(dx, dy, mirrored) for dx, dy, mirrored, _ in draws} == {(16, 16, False)}  # (256 - 224) / 2
    assert max(error for *_, error in draws) <= 5


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOADERS)
def test_lighting_offsets_have_the_papers_covariance_and_are_exactly_zero_when_off(grey_shards, pca, kind):
    base = GREY - torch.tensor([255 * m for m in MEAN], dtype=torch.float64).float()[:, None, None]
    for images, _ in epoch(train_loader(kind, grey_shards, pca, 64, lighting=False), 0):
        assert torch.equal(images - base, torch.zeros_like(images))  # the decode is exact on flat grey
    offsets = []
    loader = train_loader(kind, grey_shards, pca, 64)
    for number in range(8):
        for images, _ in epoch(loader, number):
            shift = images - base
            assert (shift.amax(dim=(2, 3)) - shift.amin(dim=(2, 3))).abs().max() < 1e-3  # the same on every pixel
            offsets.append(shift[:, :, 0, 0].double())
    offsets = torch.cat(offsets).numpy()
    assert len(offsets) == 2048
    v, lam = np.array(EIGVECS), np.array(EIGVALS)
    expected = 255**2 * v @ np.diag(0.01 * lam**2) @ v.T
    measured = np.cov(offsets, rowvar=False)
    # 2,048 draws: a variance is known to ±3% (1 s.e.); we allow 12% per eigen-direction and 10% overall
    assert np.linalg.norm(measured - expected) / np.linalg.norm(expected) < 0.10
    along = np.diag(v.T @ measured @ v) / np.diag(v.T @ expected @ v)
    assert np.all(np.abs(along - 1) < 0.12), along
    assert np.abs(offsets.mean(axis=0)).max() < 4 * 255 * 0.1 * lam[0] / len(offsets) ** 0.5


# ---------------------------------------------------------------------------------------------------------------
# parity with the torch reference; shapes and layouts


@pytest.mark.slow
@pytest.mark.parametrize("size", [(256, 224), (256, 227), SMALL_SIZE], ids=lambda s: f"{s[0]}-{s[1]}")
def test_val_centre_crop_and_all_ten_crop_views_equal_the_torch_reference_pixel_for_pixel(
        sample_shards, small_sample_shards, pca, size):
    """Measured tolerance: 0. DALI's CPU decode (libjpeg-turbo in nvImageCodec, fancy upsampling) gives the same
    bytes as Pillow-SIMD's on every real val image, so the outputs are equal, not merely within ±1."""
    val, crop = (sample_shards if size[0] == 256 else small_sample_shards)["val"], size[1]
    outputs = {}
    for ten_crop in (False, True):
        dali = list(EvalLoader(val, pca, 16, crop=crop, ten_crop=ten_crop, num_threads=2))
        reference = list(ReferenceEvalLoader(val, pca, 16, crop=crop, ten_crop=ten_crop, num_threads=0))
        assert [len(lb) for _, lb in dali] == [len(lb) for _, lb in reference] == [16, 16, 16, 2]
        for (a, la), (b, lb) in zip(dali, reference, strict=True):
            assert a.shape == b.shape == ((len(la), 10, 3, crop, crop) if ten_crop else (len(la), 3, crop, crop))
            assert torch.equal(la, lb)
            assert torch.equal(a, b), f"max |Δ| {(a - b).abs().max().item()}"
        outputs[ten_crop] = torch.cat([a for a, _ in dali])
    views = outputs[True]
    assert torch.equal(views[:, 4], outputs[False])  # view 4 is the centre crop …
    assert torch.equal(views[:, 5:], views[:, :5].flip(-1))  # … and views 5..9 mirror views 0..4


def test_loaders_are_chosen_by_name_and_refuse_impossible_settings(sample_shards, pca):
    assert isinstance(make_train_loader(sample_shards["train"], pca, 8), TrainLoader)
    assert isinstance(make_train_loader(sample_shards["train"], pca, 8, loader="torch"), ReferenceTrainLoader)
    with pytest.raises(PipeError, match="expected one of dali, torch"):
        make_eval_loader(sample_shards["val"], pca, 8, loader="pillow")
    with pytest.raises(PipeError, match="fewer than one global batch"):
        TrainLoader(sample_shards["train"], pca, 128, world_size=2)
    with pytest.raises(PipeError, match="does not fit"):
        EvalLoader(sample_shards["val"], pca, 8, crop=300)


# ---------------------------------------------------------------------------------------------------------------
# preview


def test_preview_reports_the_crop_flip_and_offset_that_made_each_augmented_image(sample_shards, pca, tmp_path):
    for s in augmented_samples(sample_shards["train"], pca, 8, seed=0):
        x, y = s.crop_at
        left, top, side = centre_square(s.original.shape[1], s.original.shape[0])
        assert left <= x <= left + side - 224 and top <= y <= top + side - 224
        patch = torch.from_numpy(s.original[y:y + 224, x:x + 224]).permute(2, 0, 1).float()
        if s.mirrored:
            patch = patch.flip(-1)
        pixel_mean = torch.tensor(255 * np.array(MEAN) - s.offset, dtype=torch.float32)
        assert torch.allclose(s.augmented, patch - pixel_mean[:, None, None], atol=1e-3)
    path = tmp_path / "pca.json"
    path.write_text(json.dumps(pca.to_json()))
    out = preview_grid(sample_shards["train"], path, tmp_path / "grid.png", n=6)
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.width > 1000 and grid.height > 2 * 224


@pytest.mark.slow
def test_preview_command_writes_the_grid_and_refuses_a_folder_without_shards(sample_shards, pca, tmp_path):
    import subprocess
    import sys

    cli = str(Path(sys.executable).with_name("alexnet-pipe"))
    path = tmp_path / "pca.json"
    path.write_text(json.dumps(pca.to_json()))
    done = subprocess.run([cli, "preview", str(sample_shards["train"]), "--pca", str(path), "--out",
                           str(tmp_path / "cli.png"), "--n", "3", "--seed", "5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    api = preview_grid(sample_shards["train"], path, tmp_path / "api.png", n=3, seed=5)
    assert (tmp_path / "cli.png").read_bytes() == api.read_bytes()
    bad = subprocess.run([cli, "preview", str(tmp_path), "--pca", str(path)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "manifest.json" in bad.stderr
