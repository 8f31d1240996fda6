"""pca-stats: exact against numpy, the math on a known Gaussian, mergeable partials, kill + rerun, real ImageNet."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.pca import Moments, merge, pca_from_moments, pixel_moments, shard_images, shard_moments
from pipeline.records import Manifest
from stages import pca as pca_stage
from stages import shard as shard_stage

IMAGENET_EIGVALS = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC0 = np.array([0.5675, 0.5808, 0.5836])


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, sample_tree) -> Path:
    """The real train samples in shards of 8 (27 shards), so kills and subsets have many units."""
    out = tmp_path_factory.mktemp("pca-shards") / "train"
    shard_stage.run(sample_tree, out, split="train", shard_size=8, workers=2)
    return out


def all_pixels(shard_dir: Path) -> np.ndarray:
    return np.concatenate([px.T for s in Manifest.read(shard_dir).shards for px in shard_images(shard_dir / s.name)])


@pytest.mark.slow
def test_pca_json_matches_numpy_on_all_decoded_pixels(sample_shards, tmp_path):
    result = pca_stage.run(sample_shards["train"], tmp_path / "pca", workers=2)
    pca = json.loads((tmp_path / "pca" / "pca.json").read_text())
    assert pca == result.product.to_json()
    x = all_pixels(sample_shards["train"]).astype(np.float64) / 255.0
    cov = np.cov(x, rowvar=False, bias=True)
    assert pca["pixels"] == len(x) and pca["images"] == 210
    assert np.abs(np.array(pca["cov"]) - cov).max() / np.abs(cov).max() < 1e-9
    assert np.allclose(pca["mean"], x.mean(axis=0), rtol=1e-12)
    assert np.allclose(pca["std"], x.std(axis=0), rtol=1e-9)
    vals, vecs = np.array(pca["eigvals"]), np.array(pca["eigvecs"])
    assert np.all(np.diff(vals) < 0)
    assert np.allclose(cov @ vecs, vecs * vals, atol=1e-12)  # columns are the eigenvectors
    assert np.all(vecs[np.abs(vecs).argmax(axis=0), range(3)] > 0)  # largest component positive
    assert set(pca) == {"pixel_scale", "pixels", "images", "mean", "std", "cov", "eigvals", "eigvecs",
                        "source_manifest_sha256"} and pca["pixel_scale"] == "0-1"


@pytest.mark.slow
def test_pca_math_recovers_a_known_gaussian():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    true_vals = np.array([1600.0, 400.0, 100.0])  # pixel² units: std 40, 20, 10 around grey 128
    cov = q @ np.diag(true_vals) @ q.T
    x = rng.multivariate_normal([128, 128, 128], cov, size=4_000_000)
    pixels = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    m = merge(pixel_moments(chunk) for chunk in np.array_split(pixels, 7))
    pca = pca_from_moments(m, "")
    assert np.allclose(pca.eigvals, true_vals / 255**2, rtol=0.01)
    for i in range(3):
        assert abs(abs(np.dot(np.array(pca.eigvecs)[:, i], q[:, i])) - 1) < 0.01


@pytest.mark.slow
def test_partials_merge_bit_identically_in_any_order_and_grouping(small_shards):
    partials = [shard_moments(small_shards / s.name) for s in Manifest.read(small_shards).shards]
    one_pass = pixel_moments(all_pixels(small_shards))
    assert merge(partials).sumsq == one_pass.sumsq and merge(partials).sum == one_pass.sum
    rnd = random.Random(1)
    for _ in range(5):
        shuffled = partials[:]
        rnd.shuffle(shuffled)
        cut = rnd.randrange(1, len(shuffled))
        grouped = merge([merge(shuffled[:cut]), merge(shuffled[cut:])])
        assert grouped == merge(partials)
        assert pca_from_moments(grouped, "") == pca_from_moments(merge(partials), "")
    assert Moments.from_json(json.loads(json.dumps(merge(partials).to_json()))) == merge(partials)


@pytest.mark.slow
def test_sigkill_then_rerun_equals_an_uninterrupted_run(small_shards, tmp_path):
    reference = tmp_path / "reference"
    pca_stage.run(small_shards, reference, workers=1)

    out = tmp_path / "killed"
    cli = Path(sys.executable).with_name("alexnet-pipe")
    proc = subprocess.Popen([str(cli), "pca-stats", str(small_shards), str(out), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list((out / "_units").glob("*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "_units").glob("*.json")}
    assert 3 <= len(finished) < 27 and not (out / "pca.json").exists()

    subprocess.run([str(cli), "pca-stats", str(small_shards), str(out)], check=True, capture_output=True)
    assert (out / "pca.json").read_bytes() == (reference / "pca.json").read_bytes()
    assert {p: (out / "_units" / p).stat().st_mtime_ns for p in finished} == finished
    for p in (reference / "_units").glob("*.json"):
        assert (out / "_units" / p.name).read_bytes() == p.read_bytes()


@pytest.mark.slow
def test_array_tasks_then_reduce_equal_a_single_pass(small_shards, tmp_path):
    reference = tmp_path / "reference"
    pca_stage.run(small_shards, reference, workers=2)
    out = tmp_path / "tasks"
    for i in range(3):
        result = pca_stage.run(small_shards, out, task_index=i, num_tasks=3, workers=1)
        assert result.finished == (i == 2)  # the last task finds every partial and reduces
    assert (out / "pca.json").read_bytes() == (reference / "pca.json").read_bytes()
    assert pca_stage.run(small_shards, out).up_to_date


@pytest.mark.slow
def test_max_images_takes_a_seeded_subsample(small_shards, tmp_path):
    a = pca_stage.run(small_shards, tmp_path / "a", max_images=50, seed=3).product
    b = pca_stage.run(small_shards, tmp_path / "b", max_images=50, seed=3).product
    c = pca_stage.run(small_shards, tmp_path / "c", max_images=50, seed=4).product
    assert a == b and a.images == 50 and c.images == 50 and a.cov != c.cov


@pytest.mark.slow
def test_real_imagenet_samples_land_near_the_published_imagenet_pca(sample_shards, tmp_path):
    pca = pca_stage.run(sample_shards["train"], tmp_path / "pca").product
    vals = np.array(pca.eigvals)
    assert np.all(np.abs(vals / IMAGENET_EIGVALS - 1) < 0.35), vals
    v0 = np.array(pca.eigvecs)[:, 0]
    angle = np.degrees(np.arccos(abs(v0 @ IMAGENET_EIGVEC0) / np.linalg.norm(IMAGENET_EIGVEC0)))
    assert angle < 2.0, angle


@pytest.mark.slow
def test_rerun_is_up_to_date_and_new_shards_make_it_stale(sample_shards, small_shards, tmp_path):
    out = tmp_path / "pca"
    pca_stage.run(small_shards, out)
    assert pca_stage.run(small_shards, out).up_to_date
    stage_json = json.loads((out / "_stage.json").read_text())
    assert stage_json["inputs"]["shards"]["digest"] == "sha256:" + json.loads(
        (out / "pca.json").read_text())["source_manifest_sha256"]
    result = pca_stage.run(sample_shards["train"], out)  # other shards → other manifest digest → recomputed
    assert not result.up_to_date and result.product.images == 210


PROBE = """
import json, sys
import numpy as np
from pipeline.engine import canonical_json
from pipeline.pca import Moments, pca_from_moments, pixel_moments
rng = np.random.default_rng(0)
moments = [Moments.from_json(d) for d in json.loads(sys.argv[1])]
for _ in range(200):  # random colour images: every covariance shape, correlated channels included
    mix = rng.normal(size=(3, 3)) * rng.uniform(0, 1, size=3)
    pixels = np.clip(rng.normal(size=(500, 3)) @ mix * 60 + rng.uniform(40, 200, size=3), 0, 255)
    moments.append(pixel_moments(pixels.astype(np.uint8)))
print(canonical_json([pca_from_moments(m, "").to_json() for m in moments]))
"""


def _has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["Haswell", pytest.param("SkylakeX", marks=pytest.mark.skipif(
    not _has_avx512(), reason="this CPU has no avx512f: OpenBLAS cannot use its SkylakeX kernels here"))])
def test_pca_json_is_the_same_bytes_under_each_openblas_kernel(kernel, small_shards):
    """pca.json keys every training run: its bytes must not depend on the CPU family a cluster node has. The
    sample shards' real partials and 200 random images' moments, reduced under a forced OpenBLAS kernel, give the
    same bytes as under this machine's own choice."""
    partials = json.dumps([shard_moments(small_shards / s.name).to_json() for s in Manifest.read(small_shards).shards])

    def reduce(env: dict) -> str:
        out = subprocess.run([sys.executable, "-c", PROBE, partials], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env}, check=True)
        return out.stdout

    assert reduce({"OPENBLAS_CORETYPE": kernel}) == reduce({})


def test_the_eigen_pairs_are_exact_for_every_kind_of_symmetric_matrix():
    """Against LAPACK to round-off: random spectra over eight decades, repeated and zero eigenvalues."""
    from pipeline.pca import symmetric_eigen

    rng = np.random.default_rng(1)
    for k in range(300):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        values = np.sort(rng.exponential(size=3))[::-1] * 10 ** rng.uniform(-6, 2)
        values[1] = values[0] if k % 5 == 0 else values[1]
        values[2] = 0.0 if k % 7 == 0 else values[2]
        cov = q @ np.diag(values) @ q.T
        cov = (cov + cov.T) / 2
        got_values, got_vectors = (np.array(x) for x in symmetric_eigen(cov.tolist()))
        scale = np.abs(cov).max()
        assert np.abs(got_values - np.linalg.eigvalsh(cov)[::-1]).max() <= 1e-14 * scale
        assert np.abs(got_vectors @ np.diag(got_values) @ got_vectors.T - cov).max() <= 1e-14 * scale
        assert np.abs(got_vectors.T @ got_vectors - np.eye(3)).max() <= 1e-14
        assert np.all(got_vectors[np.abs(got_vectors).argmax(axis=0), range(3)] > 0)


@pytest.mark.slow
def test_a_folder_finished_by_pca_stats_version_1_keeps_its_partials_and_only_reduces_again(small_shards, tmp_path):
    """After the upgrade that changed how the eigen-pairs are computed, the per-shard partials (a pass over every
    training image) are reused: the rerun only reduces; status says the folder is stale until then."""
    from pipeline.engine import MARKER, PLAN, Input, Stage
    from pipeline.status import state_of
    from stages import versions

    out = tmp_path / "pca"
    fresh = pca_stage.run(small_shards, out, workers=2).product
    old = Stage("pca-stats", 1, out, {"max_images": None, "seed": None},
                {"shards": Input.of_stage(small_shards, "manifest.json")})._key(1)
    for name in (MARKER, PLAN):
        record = json.loads((out / name).read_text())
        (out / name).write_text(json.dumps({**record, "key": old, **({"version": 1} if name == MARKER else {})}))
    (out / "pca.json").write_text("{}")  # version 1's bytes: whatever they were, they are rewritten
    units = {p.name: p.stat().st_mtime_ns for p in (out / "_units").glob("*.json")}
    assert state_of(out, versions()).state == "stale" and "stage version 1, now 2" in state_of(out, versions()).detail

    result = pca_stage.run(small_shards, out, workers=2)
    assert result.finished and result.product == fresh
    assert {p.name: p.stat().st_mtime_ns for p in (out / "_units").glob("*.json")} == units  # none recomputed
    assert state_of(out, versions()).state == "done" and pca_stage.run(small_shards, out).up_to_date
