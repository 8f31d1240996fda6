"""Output changes are never silent: each data stage pins the digest of its output on the demo set and on the real
samples next to its VERSION. Output that changes without a VERSION bump fails here, saying what to do (a stale
cache key would otherwise reuse old shards silently). Training and eval are not pinned (floats vary across CPUs)."""

from __future__ import annotations

import pytest

from pipeline.engine import output_digest
from stages import pca as pca_stage
from stages import shard as shard_stage
from stages import synth as synth_stage


@pytest.fixture(scope="module")
def outputs(tiny_data, sample_shards, tmp_path_factory) -> dict:
    """stage module → {data set: output folder}: the tiny demo set made by the CLI and the real samples."""
    sample_pca = tmp_path_factory.mktemp("golden") / "pca"
    pca_stage.run(sample_shards["train"], sample_pca, workers=1)
    return {
        synth_stage: {"demo": tiny_data["work"] / "demo-data"},
        shard_stage: {"demo-train": tiny_data["train"], "demo-val": tiny_data["val"],
                      "samples-train": sample_shards["train"], "samples-val": sample_shards["val"]},
        pca_stage: {"demo": tiny_data["pca"].parent, "samples": sample_pca},
    }


@pytest.mark.parametrize("stage", [synth_stage, shard_stage, pca_stage], ids=["synth", "shard", "pca-stats"])
def test_each_data_stage_output_matches_the_digest_pinned_next_to_its_version(stage, outputs):
    where = f"stages/{stage.__name__.split('.')[-1]}.py"
    assert stage.GOLDEN["version"] == stage.VERSION, (
        f"{where}: VERSION is {stage.VERSION} but GOLDEN pins version {stage.GOLDEN['version']}: set GOLDEN's "
        "version and digests to this version's output")
    found = {name: output_digest(folder) for name, folder in outputs[stage].items()}
    changed = {name: digest for name, digest in found.items() if digest != stage.GOLDEN.get(name)}
    assert not changed, (
        f"{where}: the output changed on {', '.join(changed)} without a VERSION bump, so existing outputs would be "
        f"reused as if nothing had changed. If intended, bump VERSION to {stage.VERSION + 1} and set GOLDEN to "
        f"{ {'version': stage.VERSION + 1, **found} }; if not, the change broke byte-reproducibility")
