"""The data stages against an adversarial user: odd files give stable, relative skip reasons and the same
manifest twice; nothing is dropped without a word; a damaged class tar costs only its tail; sizes are checked from
the header; 16-bit images are scaled; damaged shards are found cheaply and rewritten; pca.json is checked; a full
disk is one line."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_cli_here
from PIL import Image

from pipeline.errors import PipeError
from pipeline.images import BadImage, prepare_image
from pipeline.pca import check_pca
from pipeline.records import Manifest, Pca
from pipeline.shards import check_shard_files, damaged_shards
from pipeline.status import stage_rows
from stages import shard as shard_stage
from stages import versions

CLI = str(Path(sys.executable).with_name("alexnet-pipe"))
TENCH = "n01440764"


def cli(*args) -> subprocess.CompletedProcess:
    """In this process (arguments, messages, exit codes); a training run is a process of its own (`run_cli`)."""
    return run_cli_here(*args, check=False)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one error line (warnings about the data before it, such as classes a split lacks, are not errors)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def jpeg(size: tuple[int, int], colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height but holds no pixel data: only its header can be read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def sixteen_bit_png(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def quirky_tree(root: Path, sample_dir: Path) -> Path:
    """A train tree with a good image per class and every odd file a hostile source can hold."""
    tench, goldfish = root / "train" / TENCH, root / "train" / "n01443537"
    tench.mkdir(parents=True)
    goldfish.mkdir()
    shutil.copy(sample_dir / "train" / TENCH / "n01440764_tench.JPEG", tench / "n01440764_1.JPEG")
    (tench / "n01440764_2.JPEG").write_bytes(b"RIFF\x24\x00\x00\x00WEBPVP8 \x18\x00\x00\x00" + bytes(24))  # WebP
    (tench / "n01440764_3.JPEG").write_text("<html>403 Forbidden</html>\n")
    (tench / "n01440764_4.JPEG").write_bytes(jpeg((40000, 4)))  # 2.6 GB if resized blindly
    (tench / "n01440764_5.JPEG").write_bytes(png_header_only(12000, 9000))  # 108 MP: over the decode budget
    (tench / "notes.txt").write_text("not an image\n")
    (goldfish / "n01443537_1.JPEG").write_bytes(sixteen_bit_png(np.full((40, 60), 30000)))
    (root / "train" / "cats").mkdir()
    (root / "train" / "cats" / "cat_1.JPEG").write_bytes(jpeg((64, 64)))
    (root / "train" / "stray.JPEG").write_bytes(jpeg((64, 64)))
    return root


# ---------------------------------------------------------------------------------------------------------------
# 1, 2, 4, 5: odd files


def test_the_same_bad_inputs_in_two_places_give_byte_identical_manifests_with_stable_reasons(sample_dir, tmp_path):
    manifests = []
    for place in ("a", "elsewhere/b"):
        source = quirky_tree(tmp_path / place / "src", sample_dir)
        out = tmp_path / place / "out"
        result = cli("shard", source, out, "--split", "train", "--shard-size", 4, "--workers", 1)
        assert result.returncode == 0, result.stderr
        assert "2 written, 1 repaired, 4 skipped, 3 ignored" in result.stderr
        manifests.append((out / "manifest.json").read_bytes())
    assert manifests[0] == manifests[1]
    m = json.loads(manifests[0])
    reasons = {s["key"]: s["reason"] for s in m["skipped"]}
    assert reasons == {
        "n01440764_2": "undecodable: unrecognised image format (RIFF/WebP)",
        "n01440764_3": "undecodable: unrecognised image format (HTML/XML text)",
        "n01440764_4": "too elongated: 40000x4 at short side 256 would be 2560000x256, over JPEG's 65,500-pixel "
                       "limit",
        "n01440764_5": "too large to decode: 12000x9000 is over the budget of 89,478,485 pixels"}
    assert {i["name"]: i["reason"] for i in m["ignored_members"]} == {
        "train/cats/": "not a wnid class folder (expected nXXXXXXXX/)",
        "train/stray.JPEG": "a file beside the class folders",
        f"train/{TENCH}/notes.txt": "not an image file name (expected .jpeg, .jpg, .png)"}
    assert str(tmp_path) not in manifests[0].decode()


def test_a_file_that_vanishes_before_its_shard_is_written_is_skipped_without_an_absolute_path(tmp_path):
    from pipeline.records import SkippedImage
    from pipeline.shards import write_shard
    from pipeline.sources import Member

    gone = Member("n01440764_9", TENCH, f"train/{TENCH}/n01440764_9.JPEG")
    record = write_shard(tmp_path / "out", "train-000000", [gone], tmp_path, {TENCH: 0}, short_side=256, quality=95)
    assert record.skipped == (SkippedImage("n01440764_9", TENCH, gone.path, "unreadable: No such file or directory"),)


def test_extreme_aspect_ratios_are_refused_from_the_header_in_bounded_memory():
    """A 100 KB 40000×4 JPEG used to cost 2.6 GB and a 65500×1 one ~13 GB: refused before any decoding."""
    code = ("import io, re; from PIL import Image; from pipeline.images import prepare_image, BadImage\n"
            "for size in ((40000, 4), (65500, 1), (1, 65500)):\n"
            "    buf = io.BytesIO(); Image.new('L', size).save(buf, 'JPEG')\n"
            "    try: prepare_image(buf.getvalue())\n"
            "    except BadImage as e: print(e)\n"
            # VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) size across exec
            "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    *reasons, peak_mb = out.stdout.splitlines()
    assert len(reasons) == 3 and all(r.startswith("too elongated") for r in reasons), out.stdout
    assert int(peak_mb) < 200


def test_an_aspect_just_inside_the_jpeg_limit_is_still_written():
    img = prepare_image(jpeg((255 * 256, 256)), short_side=256)  # 65,280 × 256
    assert Image.open(io.BytesIO(img.jpeg)).size == (65280, 256)


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits_not_clipped():
    gradient = np.tile(np.linspace(0, 65535, 256).round(), (256, 1))
    img = prepare_image(sixteen_bit_png(gradient), short_side=256)
    pixels = np.asarray(Image.open(io.BytesIO(img.jpeg)), dtype=float)
    assert img.meta["repaired"] == ["png→jpeg", "i;16→rgb"]
    assert abs(pixels.mean() - 127.5) < 1.5  # clipped, it was 254.3
    assert pixels[:, 0].mean() < 2 and pixels[:, -1].mean() > 253  # black stays black, white white
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() < 3  # still gray


def test_a_png_that_pillow_reads_as_8_bit_keeps_its_bytes():
    """Only 16-bit samples take the new path: an ordinary grayscale PNG converts as before."""
    buf = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buf, "PNG")
    assert prepare_image(buf.getvalue()).meta["repaired"] == ["png→jpeg", "l→rgb"]
    with pytest.raises(BadImage, match="unrecognised image format \\(text\\)"):
        prepare_image(b"just some words\n")


# ---------------------------------------------------------------------------------------------------------------
# 3: a damaged class tar inside the official train archive


def class_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("cut", ["inside-a-member", "inside-a-header"])
def test_a_damaged_class_tar_keeps_what_precedes_the_damage_and_the_split_goes_on(cut, sample_dir, tmp_path):
    image = (sample_dir / "train" / TENCH / "n01440764_tench.JPEG").read_bytes()
    good = class_tar({"n01443537_1.JPEG": image, "n01443537_2.JPEG": image})
    damaged = class_tar({f"{TENCH}_{i}.JPEG": image for i in (1, 2, 3)})
    second_header = 512 + -(-len(image) // 512) * 512
    damaged = damaged[: second_header + (512 + len(image) // 2 if cut == "inside-a-member" else 100)]
    root = tmp_path / "ilsvrc"
    root.mkdir()
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        for name, data in ((f"{TENCH}.tar", damaged), ("n01443537.tar", good)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            outer.addfile(info, io.BytesIO(data))
    result = cli("shard", root, tmp_path / "out", "--split", "train", "--workers", 1)
    assert result.returncode == 0, result.stderr
    m = Manifest.read(tmp_path / "out")
    assert m.samples == 3 and {c.wnid: c.samples for c in m.classes} == {TENCH: 1, "n01443537": 2}
    [lost] = m.skipped
    assert lost.path == f"ILSVRC2012_img_train.tar/{TENCH}.tar" and lost.wnid == TENCH
    assert lost.reason.startswith(f"damaged class tar {TENCH}.tar (")
    assert "1 complete images before the damage kept" in lost.reason
    assert f"skipped ILSVRC2012_img_train.tar/{TENCH}.tar: damaged class tar" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# 6: damaged shards are found by size, reported and rewritten


@pytest.fixture
def shard_copy(sample_shards, tmp_path) -> Path:
    out = tmp_path / "work" / "shards" / "val"
    shutil.copytree(sample_shards["val"], out)
    return out


@pytest.mark.slow
def test_a_truncated_or_deleted_shard_is_damaged_and_shard_rewrites_exactly_those(sample_tree, shard_copy):
    original = {p.name: p.read_bytes() for p in shard_copy.glob("val-*")}
    names = sorted(p.name for p in shard_copy.glob("*.tar"))
    (shard_copy / names[1]).write_bytes(original[names[1]][:5000])
    (shard_copy / names[2]).unlink()
    manifest = Manifest.read(shard_copy)
    assert damaged_shards(shard_copy, manifest) == [names[1], names[2]]
    with pytest.raises(PipeError, match=f"{names[1]}: expected a shard of .* bytes \\(manifest.json\\), found "
                                        "5,000 bytes \\(1 more shard\\(s\\) damaged\\); run `alexnet-pipe verify"):
        check_shard_files(shard_copy, manifest)
    [row] = [r for r in stage_rows(shard_copy.parents[1], versions()) if r[0] == "shard val"]
    assert row[2].state == "damaged" and f"alexnet-pipe verify {shard_copy}" in row[2].detail

    untouched = {n: (shard_copy / n).stat().st_mtime_ns for n in names if n not in names[1:3]}
    result = cli("shard", sample_tree, shard_copy, "--split", "val", "--shard-size", 16)
    assert result.returncode == 0, result.stderr
    assert f"2 shard(s) missing or changed in size ({names[1]}, {names[2]}); rewriting exactly those" in result.stderr
    assert {p.name: p.read_bytes() for p in shard_copy.glob("val-*")} == original
    assert {n: (shard_copy / n).stat().st_mtime_ns for n in untouched} == untouched
    assert "up to date" in cli("shard", sample_tree, shard_copy, "--split", "val", "--shard-size", 16).stderr
    check_shard_files(shard_copy, Manifest.read(shard_copy))


def test_a_missing_index_or_member_list_is_repaired_too(sample_tree, shard_copy):
    (shard_copy / "val-000000.idx").unlink()
    shutil.rmtree(shard_copy / "_lists")
    with pytest.raises(PipeError, match="found no index val-000000.idx beside it"):
        check_shard_files(shard_copy, Manifest.read(shard_copy))
    result = shard_stage.run(sample_tree, shard_copy, split="val", shard_size=16, workers=1)
    assert result.product.rewritten == ("val-000000.tar",) and result.finished
    assert cli("verify", shard_copy).returncode == 0


def test_a_deleted_manifest_is_damaged_and_written_again(sample_tree, shard_copy):
    manifest = (shard_copy / "manifest.json").read_bytes()
    (shard_copy / "manifest.json").unlink()
    [row] = [r for r in stage_rows(shard_copy.parents[1], versions()) if r[0] == "shard val"]
    assert row[2].state == "damaged" and "manifest.json" in row[2].detail
    result = shard_stage.run(sample_tree, shard_copy, split="val", shard_size=16, workers=1)
    assert result.product.rewritten == ("manifest.json",) and result.finished
    assert (shard_copy / "manifest.json").read_bytes() == manifest


# ---------------------------------------------------------------------------------------------------------------
# 7: pca.json


def test_check_pca_accepts_what_pca_stats_writes(tiny_data):
    check_pca(Pca.from_json(json.loads(tiny_data["pca"].read_text())), tiny_data["pca"])


@pytest.mark.parametrize("change, expected", [
    ({"eigvals": [1e9, 0.01, -5]}, "eigenvalues non-negative and descending"),
    ({"eigvals": [0.001, 0.01, 0.2]}, "eigenvalues non-negative and descending"),
    ({"cov": [[0.1, 0.5, 0], [0.5, 0.1, 0], [0, 0, 0.1]]}, "positive semi-definite"),
    ({"cov": [[0.1, 0.01, 0], [0.02, 0.1, 0], [0, 0, 0.1]]}, "symmetric covariance"),
    ({"eigvecs": [[1, 1, 0], [0, 1, 0], [0, 0, 1]]}, "orthonormal eigenvectors"),
    ({"eigvals": [0.3, 0.0141, 0.0034]}, "eigvecs·diag\\(eigvals\\)·eigvecsᵀ = cov"),
    ({"eigvals": [0.1, "x", 0]}, "finite numbers"),
])
def test_check_pca_refuses_inconsistent_statistics_in_one_line(change, expected, tiny_data):
    good = json.loads(tiny_data["pca"].read_text())
    if "cov" in change and "eigvals" not in change:  # keep the eigen-pairs consistent with a valid cov
        good["eigvals"], good["eigvecs"] = [0.6, 0.1, -0.4], np.eye(3).tolist()
    with pytest.raises(PipeError, match=expected) as e:
        check_pca(Pca.from_json({**good, **change}), Path("pca.json"))
    assert "\n" not in str(e.value) and str(e.value).startswith("pca.json: expected")


@pytest.mark.slow
def test_train_on_a_cut_shard_or_a_wrong_pca_json_is_one_line_not_a_dali_error(tiny_data, tmp_path, train_cmd):
    data = {**tiny_data, "train": tmp_path / "train", "pca": tmp_path / "pca" / "pca.json"}
    shutil.copytree(tiny_data["train"], data["train"])
    shutil.copytree(tiny_data["pca"].parent, data["pca"].parent)
    tar = sorted(data["train"].glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:3000])
    out = run_cli(*train_cmd(data, tmp_path / "run", max_steps=1), check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"{tar.name}: expected a shard of" in out.stderr and "alexnet-pipe verify" in out.stderr
    assert "Malformed" not in out.stderr

    shutil.rmtree(data["train"])
    shutil.copytree(tiny_data["train"], data["train"])
    pca = json.loads(tiny_data["pca"].read_text())
    data["pca"].write_text(json.dumps({**pca, "eigvals": [1e9, 0.01, -5]}))
    out = run_cli(*train_cmd(data, tmp_path / "run2", max_steps=1), check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"{data['pca']}: expected" in out.stderr and "non-negative" in out.stderr


# ---------------------------------------------------------------------------------------------------------------
# 8: a full disk


@pytest.mark.slow
def test_a_full_disk_during_shard_is_one_line_and_a_rerun_completes_identically(small_disk, sample_tree,
                                                                               sample_shards):
    disk, grow = small_disk
    out = disk / "val"
    result = cli("shard", sample_tree, out, "--split", "val", "--shard-size", 16, "--workers", 2)
    line = one_line_error(result)
    assert "no space left on the device while writing it" in line and str(out) in line and "rerun" in line
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "_units").glob("val-*.json")}  # finished shards stay
    grow()
    assert cli("shard", sample_tree, out, "--split", "val", "--shard-size", 16).returncode == 0
    assert (out / "manifest.json").read_bytes() == (sample_shards["val"] / "manifest.json").read_bytes()
    assert {name: (out / "_units" / name).stat().st_mtime_ns for name in kept} == kept


@pytest.mark.slow
def test_a_full_disk_during_pca_stats_is_one_line_and_a_rerun_completes_identically(small_disk, tiny_data):
    disk, grow = small_disk
    (disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 6 * 4096))  # room for a handful of pages
    out = disk / "pca"
    line = one_line_error(cli("pca-stats", tiny_data["train"], out, "--workers", 1))
    assert "no space left on the device" in line and str(out) in line
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    (disk / "filler").unlink()
    grow()
    assert cli("pca-stats", tiny_data["train"], out).returncode == 0
    assert (out / "pca.json").read_bytes() == tiny_data["pca"].read_bytes()
