"""The ablation switches (activation, norm, pool, towers): each builds the net it names, trains, and is read back from
the checkpoint by eval and the report; train_top1_error is counted from the trained batches."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.model import AlexNet, AlexNetConfig, build_model, count_parameters
from pipeline.records import RunSpec
from pipeline.train.loop import train_step
from pipeline.train.schedule import make_optimizer

SMALL = 0.125

# §3.2's footnote: the one-GPU net has half the two-GPU net's kernels in conv1-conv4 (48, 128, 192, 192), the full
# count in conv5 (256) and full-size fc layers (4096, 4096), all in one column, 1,000 outputs:
#   conv1  3·11·11·48 + 48      =     17,472
#   conv2  48·5·5·128 + 128     =    153,728
#   conv3  128·3·3·192 + 192    =    221,376
#   conv4  192·3·3·192 + 192    =    331,968
#   conv5  192·3·3·256 + 256    =    442,624
#   fc6    256·6·6·4096 + 4096  = 37,752,832
#   fc7    4096·4096 + 4096     = 16,781,312
#   fc8    4096·1000 + 1000     =  4,097,000
#   total                         59,798,312
ONE_TOWER_PARAMETERS = 59_798_312
# BatchNorm2d adds a weight and a bias per map after conv1 (48) and conv2 (128) in each tower: 2·2·(48+128) = 704
BATCH_NORM_PARAMETERS = 60_965_224 + 704

VARIANTS = [
    ({}, nn.LocalResponseNorm, 3, torch.relu),
    ({"activation": "tanh"}, nn.LocalResponseNorm, 3, torch.tanh),
    ({"norm": "none"}, nn.Identity, 3, torch.relu),
    ({"norm": "batch"}, nn.BatchNorm2d, 3, torch.relu),
    ({"pool": "plain"}, nn.LocalResponseNorm, 2, torch.relu),
    ({"towers": 1}, nn.LocalResponseNorm, 3, torch.relu),
]


def shapes_seen(model: AlexNet, crop: int = 224) -> dict[str, list]:
    seen: dict[str, list] = {"conv1": [], "pool": [], "fc6": []}
    tower = model.towers[0]
    tower.conv1.register_forward_hook(lambda m, args, out: seen["conv1"].append(tuple(out.shape[-2:])))
    tower.pool.register_forward_hook(lambda m, args, out: seen["pool"].append(tuple(out.shape[-2:])))
    tower.fc6.register_forward_hook(lambda m, args, out: seen["fc6"].append(args[0].shape[-1]))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, crop, crop))
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(("settings", "norm", "pool_size", "act"), VARIANTS, ids=lambda v: str(v))
def test_each_switch_builds_its_layers_with_the_55_27_13_6_maps_and_trains(settings, norm, pool_size, act):
    model = AlexNet(AlexNetConfig(num_classes=10, **settings))
    towers = settings.get("towers", 2)
    assert len(model.towers) == towers
    for tower in model.towers:
        assert type(tower.norm1) is norm and type(tower.norm2) is norm
        assert tower.pool.kernel_size == pool_size and tower.pool.stride == 2
        x = torch.linspace(-3, 3, 7)
        torch.testing.assert_close(tower.act(x), act(x))
    if norm is nn.BatchNorm2d:
        assert [t.norm1.num_features for t in model.towers] == [48, 48]
        assert [t.norm2.num_features for t in model.towers] == [128, 128]
    seen = shapes_seen(model)
    assert seen["conv1"] == [(55, 55)]
    assert seen["pool"] == [(27, 27), (13, 13), (6, 6)]
    assert seen["fc6"] == [9216]  # 6·6·256: both towers' 128 maps, or the one tower's 256

    small = build_model(AlexNetConfig(width=SMALL, num_classes=10, dropout=0.0, **settings), ["cpu"])
    optimizer = make_optimizer(small, TrainConfig(lr=0.01))
    images, labels = torch.randn(4, 3, 224, 224), torch.tensor([0, 3, 5, 7])
    small.train()
    losses = [train_step(small, optimizer, images, labels)[0].item() for _ in range(6)]
    assert all(torch.isfinite(p).all() for p in small.parameters())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_parameter_counts_two_towers_one_tower_by_hand_and_batch_norm():
    assert count_parameters(AlexNet(AlexNetConfig())) == 60_965_224
    assert count_parameters(AlexNet(AlexNetConfig(towers=1))) == ONE_TOWER_PARAMETERS
    assert count_parameters(AlexNet(AlexNetConfig(norm="batch"))) == BATCH_NORM_PARAMETERS
    for same in ({"activation": "tanh"}, {"norm": "none"}, {"pool": "plain"}):
        assert count_parameters(AlexNet(AlexNetConfig(**same))) == 60_965_224
    one = AlexNet(AlexNetConfig(towers=1)).towers[0]
    widths = [one.conv1.out_channels, one.conv2.out_channels, one.conv3.out_channels, one.conv4.out_channels,
              one.conv5.out_channels, one.fc6.out_features, one.fc7.out_features]
    assert widths == [48, 128, 192, 192, 256, 4096, 4096]


def test_one_tower_on_a_two_device_map_is_refused():
    from pipeline.errors import PipeError

    with pytest.raises(PipeError, match="towers=1.*one device"):
        build_model(AlexNetConfig(width=SMALL, towers=1), ["cpu", "cpu"])


@pytest.mark.slow
def test_train_step_counts_the_top1_mistakes_of_the_logits_it_trains_on():
    torch.manual_seed(0)
    model = build_model(AlexNetConfig(width=SMALL, num_classes=10, dropout=0.0), ["cpu"]).train()
    images, labels = torch.randn(8, 3, 224, 224), torch.arange(8)
    with torch.no_grad():
        expected = int((model(images).argmax(dim=1) != labels).sum())
    _, mistakes = train_step(model, make_optimizer(model, TrainConfig()), images, labels)
    assert int(mistakes) == expected


@pytest.mark.slow
def test_a_cli_run_with_every_switch_records_them_and_its_training_error(tiny_data, train_cmd, cli, sample_dir,
                                                                       tmp_path):
    out = tmp_path / "run"
    switches = {"activation": "tanh", "norm": "batch", "pool": "plain", "towers": "1"}
    cli(*train_cmd(tiny_data, out, epochs=1, **switches))
    state = torch.load(sorted((out / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    model = RunSpec.of_checkpoint(state).model
    assert {k: getattr(model, k) for k in switches} == {**switches, "towers": 1}
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    epochs = [r for r in records if "val_top1_error" in r]
    assert len(epochs) == 1
    # 36 training images, every one trained once: the error is a count of mistakes over 36
    mistakes = epochs[0]["train_top1_error"] * 36
    assert abs(mistakes - round(mistakes)) < 1e-4 and 0 <= mistakes <= 36
    cli("eval", out, "--val", tiny_data["val"], "--out", tmp_path / "eval", "--devices", "cpu", "--no-ten-crop")
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert {k: evaluated["model"][k] for k in switches} == {**switches, "towers": 1}
    cli("report", out, "--eval", tmp_path / "eval", "--out", tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "activation tanh, norm batch, pool plain, towers 1" in report
    # predict builds the switched net from the checkpoint: tanh, BatchNorm, plain pools, one tower
    from pipeline.predict import load_classifier

    classifier = load_classifier(sorted((out / "checkpoints").glob("step-*.pt"))[-1], "cpu")
    kinds = {type(m).__name__ for m in classifier.model.modules()}
    assert "BatchNorm2d" in kinds and "LocalResponseNorm" not in kinds
    assert {m.act for m in classifier.model.modules() if hasattr(m, "act")} == {torch.tanh}
    assert classifier.spec.model.pool == "plain" and classifier.spec.model.towers == 1
    images = sorted((sample_dir / "val").glob("*.JPEG"))[:2]
    predicted = cli("predict", out, *images, "--json", "--devices", "cpu", "--top", "3")
    records = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in images] and all(len(r["top"]) == 3 for r in records)
    refused = cli(*train_cmd(tiny_data, tmp_path / "two", towers=1, devices="cpu,cpu"), check=False)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "towers=1" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_training_error_survives_a_resume_mid_epoch(tiny_data, tiny_run, train_cmd, cli, tmp_path):
    """The tiny run checkpoints at steps 3, 6, 9 …: resumed from step 12 (inside epoch 1) it logs epoch 1's
    training error as the uninterrupted run did."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    for checkpoint in (copy / "checkpoints").glob("step-*.pt"):
        if int(checkpoint.stem.split("-")[1]) > 12:
            checkpoint.unlink()
    (copy / "_stage.json").unlink()
    cli(*train_cmd(tiny_data, copy))
    ours, theirs = ([r["train_top1_error"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                     if "val_top1_error" in r] for run in (copy, tiny_run))
    assert ours == theirs and len(ours) == 2 and all(0 <= e <= 1 for e in ours)


def test_grouped_twin_refuses_the_switches_it_does_not_implement():
    from alexnet_grouped import AlexNetGrouped

    for settings in ({"towers": 1}, {"norm": "batch"}):
        with pytest.raises(ValueError, match="grouped"):
            AlexNetGrouped(AlexNetConfig(width=SMALL, **settings))
