"""The paper's Figure 3 (conv1 kernels, chroma per tower) and Figure 4 (nearest training images by fc7 features),
computed by `eval` and laid out by the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import AlexNetConfig
from pipeline.figures import chroma_energy, nearest, neighbour_correlation
from pipeline.model import build_model, initial_model
from pipeline.records import Pca, RunSpec

NEIGHBOUR_LIMIT = 20


def test_streamed_nearest_neighbours_equal_a_brute_force_search():
    gen = torch.Generator().manual_seed(0)
    queries, pool = torch.randn(5, 16, generator=gen), torch.randn(203, 16, generator=gen)
    ids = [f"img{i}" for i in range(len(pool))]
    batches = [(ids[i:i + 7], pool[i:i + 7]) for i in range(0, len(pool), 7)]
    found = nearest(queries, iter(batches), k=6)
    distances = torch.cdist(queries.double(), pool.double())
    for q, row in enumerate(found):
        order = distances[q].argsort()[:6]
        assert [i for _, i in row] == [ids[j] for j in order.tolist()]
        assert [d for d, _ in row] == pytest.approx(distances[q, order].tolist(), abs=1e-9)
    assert nearest(queries[:1], iter([(ids[:3], pool[:3])]), k=6)[0].__len__() == 3  # fewer candidates than k


def test_chroma_energy_is_zero_for_grey_kernels_and_the_off_grey_share_otherwise():
    grey = np.broadcast_to(np.random.default_rng(0).normal(size=(1, 1, 11, 11)), (1, 3, 11, 11))
    red_green = np.zeros((1, 3, 11, 11))
    red_green[0, 0], red_green[0, 1] = 1.0, -1.0  # mean over RGB 0: all of its energy is colour
    mixed = np.ones((1, 3, 11, 11))
    mixed[0, 2] = 4.0  # mean 2; off-grey energy (1+1+4)·121, total (1+1+16)·121
    energies = chroma_energy(np.concatenate([grey, red_green, mixed]))
    assert energies.tolist() == pytest.approx([0.0, 1.0, 6 / 18])


def test_neighbour_correlation_is_about_zero_for_random_weights_and_high_for_smooth_ones():
    noise = np.random.default_rng(0).normal(size=(48, 3, 11, 11))
    y, x = np.mgrid[-5:6, -5:6]
    blob = np.exp(-(x**2 + y**2) / 8.0)
    edge = np.tanh(x / 2.0)
    smooth = np.stack([np.stack([blob, -blob, blob]), np.stack([edge, edge, edge])])
    assert abs(neighbour_correlation(noise).mean()) < 0.03
    assert (neighbour_correlation(smooth) > 0.8).all()


def test_the_initial_model_is_what_a_run_starts_from_and_leaves_the_random_state_alone():
    config = AlexNetConfig(width=0.125, init="default")
    before = torch.get_rng_state()
    drawn = initial_model(config, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(3)  # as pipeline.train.prepare builds it
    built = build_model(config)
    assert all(torch.equal(a, b) for a, b in zip(drawn.state_dict().values(), built.state_dict().values()))


@pytest.fixture(scope="module")
def figured(tiny_run, tiny_data, cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    cli("eval", tiny_run, "--val", tiny_data["val"], "--out", out / "eval", "--devices", "cpu", "--no-ten-crop",
        "--train", tiny_data["train"], "--neighbour-train-images", NEIGHBOUR_LIMIT)
    cli("report", tiny_run, "--eval", out / "eval", "--out", out / "report")
    return out


@pytest.mark.slow
def test_eval_writes_conv1s_kernels_per_tower_with_their_chroma(figured, tiny_run):
    result = json.loads((figured / "eval" / "eval.json").read_text())
    state = torch.load(sorted((tiny_run / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    towers = result["figure3"]["towers"]
    assert len(towers) == 2
    for i, tower in enumerate(towers):
        weights = state["model"][f"towers.{i}.conv1.weight"].numpy()
        np.testing.assert_allclose(np.array(tower["kernels"]), weights, atol=1e-6)
        np.testing.assert_allclose(tower["chroma"], chroma_energy(weights), atol=1e-6)
        assert tower["mean_chroma"] == pytest.approx(chroma_energy(weights).mean(), abs=1e-6)
        assert tower["neighbour_correlation"] == pytest.approx(neighbour_correlation(weights).mean(), abs=1e-6)
        start = initial_model(RunSpec.of_checkpoint(state).model, seed=0).towers[i].conv1.weight.detach().numpy()
        assert tower["neighbour_correlation_at_init"] == pytest.approx(neighbour_correlation(start).mean(), abs=1e-6)
    assert isinstance(result["figure3"]["differ"], bool)


@pytest.mark.slow
def test_eval_finds_the_nearest_training_images_of_a_brute_force_fc7_search(figured, tiny_run, tiny_data):
    from pipeline.augment import reference_eval_samples

    result = json.loads((figured / "eval" / "eval.json").read_text())["figure4"]
    state = torch.load(sorted((tiny_run / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    net = build_model(RunSpec.of_checkpoint(state).model, ["cpu"])
    net.load_state_dict(state["model"])
    net.eval()
    pca = Pca.read(tiny_data["pca"])
    val = list(reference_eval_samples(tiny_data["val"], pca, limit=5))
    train = list(reference_eval_samples(tiny_data["train"], pca, limit=NEIGHBOUR_LIMIT))
    trained_on = list(reference_eval_samples(tiny_data["train"], pca, limit=18))  # as many as val holds
    with torch.no_grad():
        scores = net(torch.stack([image for _, image, _ in trained_on]))
    wrong = sum(int(s.argmax()) != label for s, (_, _, label) in zip(scores, trained_on))
    measured = json.loads((figured / "eval" / "eval.json").read_text())["train_centre"]
    assert (measured["samples"], measured["top1_error"]) == (18, pytest.approx(wrong / 18))
    with torch.no_grad():
        fq = net.features(torch.stack([image for _, image, _ in val]))
        ft = net.features(torch.stack([image for _, image, _ in train]))
        fc8 = net(torch.stack([image for _, image, _ in val]))
    torch.testing.assert_close(net.fc8(fq), fc8)  # the features are what fc8 reads
    assert (fq >= 0).all()  # after the ReLU
    distances = torch.cdist(fq.double(), ft.double())
    assert result["train_images"] == NEIGHBOUR_LIMIT
    assert [q["key"] for q in result["queries"]] == [key for key, _, _ in val]
    for q, query in enumerate(result["queries"]):
        order = distances[q].argsort()[:6].tolist()
        assert [n["key"] for n in query["neighbours"]] == [train[j][0] for j in order]
        assert [n["label"] for n in query["neighbours"]] == [train[j][2] for j in order]
        assert [n["distance"] for n in query["neighbours"]] == pytest.approx(distances[q, order].tolist(), abs=1e-4)


@pytest.mark.slow
def test_report_lays_out_figure3_and_figure4_from_eval_json(figured):
    result = json.loads((figured / "eval" / "eval.json").read_text())
    md = (figured / "report" / "report.md").read_text()
    for tower, name in zip(result["figure3"]["towers"], "AB"):
        assert f"tower {name} {tower['mean_chroma']:.3f}" in md
    assert "![figure 3](figure3.png)" in md and "![figure 4](figure4.png)" in md
    assert f"searched over {NEIGHBOUR_LIMIT} training images" in md
    assert "Learnt structure vs the initial noise" in md and "(step 0: " in md
    assert Image.open(figured / "report" / "figure3.png").size[0] == 800  # 8 inches at 100 dpi, a caption a tower
    assert Image.open(figured / "report" / "figure4.png").size[0] > 0
