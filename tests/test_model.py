"""pipeline/model.py: the paper's two-tower AlexNet, its groups=2 twin (tests/alexnet_grouped.py), the device map,
LRN, init."""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from alexnet_grouped import AlexNetGrouped, grouped_reference
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import map_sides
from pipeline.experiments.claims import VARIANTS
from pipeline.model import AlexNet, AlexNetConfig, build_model, count_parameters, forward_flops, local_response_norm

SMALL = 0.125  # width for tests that do not need the paper's channel counts
PIXEL_SCALE = 30  # inputs the size of mean-subtracted 0-255 pixels, so LRN's α term shapes the output


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-scaled weights and random biases, so every layer (not the paper init's bias-1 constants) shapes the
    output; a mis-ordered copy of any layer then changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * math.sqrt(2 / fan_in))
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model


@pytest.mark.slow
def test_parameter_count_is_the_papers_60_965_224_and_torchvision_differs():
    model = AlexNet(AlexNetConfig())
    assert count_parameters(model) == 60_965_224
    assert count_parameters(torchvision.models.alexnet()) == 61_100_840  # a different, one-column model
    assert count_parameters(AlexNetGrouped(AlexNetConfig())) == 60_965_224


@pytest.mark.parametrize(("crop", "padding"), [(224, 2), (227, 0)])
def test_both_crops_give_55_27_13_6_maps_and_9216_fc6_inputs(crop, padding):
    model = AlexNet(AlexNetConfig(crop=crop, num_classes=10)).eval()
    tower = model.towers[0]
    assert tower.conv1.padding == (padding, padding)
    seen: dict[str, list] = {"conv1": [], "pool": [], "fc6": []}
    tower.conv1.register_forward_hook(lambda m, args, out: seen["conv1"].append(out.shape[-2:]))
    tower.pool.register_forward_hook(lambda m, args, out: seen["pool"].append(out.shape[-2:]))
    tower.fc6.register_forward_hook(lambda m, args, out: seen["fc6"].append(args[0].shape[-1]))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, crop, crop))
    assert seen["conv1"] == [(55, 55)]
    assert seen["pool"] == [(27, 27), (13, 13), (6, 6)]
    assert seen["fc6"] == [9216]
    assert logits.shape == (1, 10)


@pytest.mark.parametrize(("crop", "pool", "conv1", "pools"), [
    (112, "overlap", 27, [13, 6, 2]), (112, "plain", 27, [13, 6, 3]),  # plain pooling keeps a larger pool5
    (128, "overlap", 31, [15, 7, 3]), (63, "overlap", 15, [7, 3, 1]), (63, "plain", 15, [7, 3, 1]),
    (256, "overlap", 63, [31, 15, 7]),
])
def test_any_crop_from_63_builds_the_net_its_layers_measure_and_fc6_reads_the_pooled_maps(crop, pool, conv1, pools):
    config = AlexNetConfig(crop=crop, pool=pool, num_classes=10, width=0.25)
    sides = map_sides(crop, pool)
    assert (sides["conv1"], [sides["pool1"], sides["pool2"], sides["pool5"]]) == (conv1, pools)  # what docs state
    model = AlexNet(config).eval()
    tower = model.towers[0]
    assert tower.conv1.padding == (2, 2)
    seen: dict[str, list] = {"conv1": [], "pool": [], "fc6": []}
    tower.conv1.register_forward_hook(lambda m, args, out: seen["conv1"].append(out.shape[-1]))
    tower.pool.register_forward_hook(lambda m, args, out: seen["pool"].append(out.shape[-1]))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, crop, crop))
    assert seen == {"conv1": [conv1], "pool": pools, "fc6": []} and logits.shape == (2, 10)
    assert tower.fc6.in_features == 2 * config.channels(128) * pools[-1] ** 2
    assert (forward_flops(config) < forward_flops(replace(config, crop=224))) == (crop < 224)  # MFU's divisor


@pytest.mark.parametrize("crop", [0, 62])
def test_a_crop_whose_pool5_maps_would_vanish_is_refused(crop):
    with pytest.raises(ValueError, match="crop must be >= 63"):
        AlexNetConfig(crop=crop)


@pytest.mark.slow
@pytest.mark.parametrize(("width", "batch"), [(1.0, 2), (SMALL, 3)])
def test_two_towers_equal_the_grouped_single_column_given_the_same_weights(width, batch):
    """In float64, so that a tolerance far below any mapping error is not eaten by float32 summation order."""
    model = randomize_(AlexNet(AlexNetConfig(width=width, num_classes=50))).double().eval()
    grouped = grouped_reference(model)
    assert not grouped.training and grouped.fc6.weight.dtype == torch.float64
    x = torch.randn(batch, 3, 224, 224, dtype=torch.float64) * PIXEL_SCALE
    with torch.no_grad():
        expected, got = model(x), grouped(x)
    assert expected.std() > 1  # the logits carry signal, not only biases
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_grouped_twin_differs_when_the_towers_are_swapped():
    """The equality above is not vacuous: the same weights in the other tower order give other logits."""
    model = randomize_(AlexNet(AlexNetConfig(width=SMALL, num_classes=10))).eval()
    swapped = AlexNet(model.config).eval()
    swapped.load_state_dict(model.state_dict())
    swapped.towers = nn.ModuleList([swapped.towers[1], swapped.towers[0]])
    x = torch.randn(2, 3, 224, 224) * PIXEL_SCALE
    with torch.no_grad():
        assert not torch.allclose(grouped_reference(swapped)(x), model(x), atol=1e-3)


def test_caffes_lrn_across_all_maps_is_not_the_two_tower_net():
    """Why AlexNetGrouped normalizes each half on its own: one LRN over the whole column crosses towers."""

    class CaffeLRN(AlexNetGrouped):
        def norm(self, x: torch.Tensor) -> torch.Tensor:
            return self.lrn(x)

    model = randomize_(AlexNet(AlexNetConfig(width=SMALL, num_classes=10))).eval()
    x = torch.randn(2, 3, 224, 224) * PIXEL_SCALE
    with torch.no_grad():
        caffe = CaffeLRN(model.config).load_from_two_tower(model).eval()
        assert not torch.allclose(caffe(x), model(x), atol=1e-3)


def test_two_cpu_devices_give_the_one_device_output_and_tower_b_reports_the_second():
    config = AlexNetConfig(width=SMALL, num_classes=10)
    torch.manual_seed(0)
    one = build_model(config, ["cpu"])
    two = build_model(config, [torch.device("cpu"), "cpu"])
    two.load_state_dict(one.state_dict())
    randomize_(one), randomize_(two)
    assert two.devices == [torch.device("cpu"), torch.device("cpu")]
    assert {p.device for p in two.towers[1].parameters()} == {torch.device("cpu")}
    assert {p.device for p in [*two.towers[0].parameters(), *two.fc8.parameters()]} == {torch.device("cpu")}
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(two.eval()(x), one.eval()(x), atol=1e-6, rtol=0)


class RecordMoves(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.moves: list[tuple[tuple[int, ...], torch.device]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            self.moves.append((tuple(args[0].shape), torch.device(args[1])))
        return func(*args, **kwargs)


def test_tensors_cross_towers_only_at_the_input_conv3_fc6_fc7_and_fc8():
    config = AlexNetConfig(width=SMALL, num_classes=10)
    model = build_model(config, ["cpu", "cpu"]).eval()
    c = config.channels
    with torch.no_grad(), RecordMoves() as recorder:
        model(torch.randn(2, 3, 224, 224))
    moved = {shape for shape, _ in recorder.moves}
    assert moved == {(2, 3, 224, 224), (2, c(128), 13, 13), (2, c(128) * 36), (2, c(2048))}
    # input → B once; conv3, fc6, fc7: both halves to both towers; fc8: both halves to A
    assert len(recorder.moves) == 1 + 3 * 4 + 2


def test_placing_towers_on_devices_of_two_kinds_is_refused():
    with pytest.raises(ValueError, match="one type"):
        build_model(AlexNetConfig(width=SMALL), ["cpu", "meta"])
    with pytest.raises(ValueError, match="one or two"):
        build_model(AlexNetConfig(width=SMALL), ["cpu", "cpu", "cpu"])


def lrn_by_hand(a: torch.Tensor, n: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """§3.3 as printed: b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta."""
    channels = a.shape[1]
    b = torch.empty_like(a)
    for i in range(channels):
        total = torch.zeros_like(a[:, 0])
        for j in range(max(0, i - n // 2), min(channels - 1, i + n // 2) + 1):
            total = total + a[:, j] ** 2
        b[:, i] = a[:, i] / (k + alpha * total) ** beta
    return b


@pytest.mark.parametrize(("convention", "alpha"), [("paper", 1e-4), ("caffe", 1e-4 / 5)])
def test_lrn_equals_the_printed_formula_with_alpha_as_printed_or_caffes_alpha_over_n(convention, alpha):
    model = AlexNet(AlexNetConfig(width=SMALL, lrn_convention=convention))
    a = torch.randn(2, 12, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 30
    for norm in (model.towers[0].norm1, model.towers[0].norm2, model.towers[1].norm1, model.towers[1].norm2):
        torch.testing.assert_close(norm(a), lrn_by_hand(a, n=5, alpha=alpha, beta=0.75, k=2.0),
                                   rtol=1e-12, atol=0)
    other = 1e-4 / 5 if convention == "paper" else 1e-4  # the α term matters at this scale: a swap would fail
    assert not torch.allclose(lrn_by_hand(a, 5, other, 0.75, 2.0), lrn_by_hand(a, 5, alpha, 0.75, 2.0),
                              rtol=0.01)


def test_lrn_default_is_the_printed_formula_in_torchs_terms():
    norm = local_response_norm(AlexNetConfig())
    assert (norm.size, norm.alpha, norm.beta, norm.k) == (5, pytest.approx(5e-4), 0.75, 2.0)


def test_init_draws_weights_from_n_0_001_and_sets_biases_1_in_conv2_conv4_conv5_fc6_fc7():
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=1000))
    layers = {f"{t}.{name}": getattr(tower, name) for t, tower in zip("AB", model.towers)
              for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")}
    layers["fc8"] = model.fc8
    for name, layer in layers.items():
        w = layer.weight
        assert w.std().item() == pytest.approx(0.01, rel=0.03 if w.numel() > 30_000 else 0.05), name
        assert abs(w.mean().item()) < 4 * 0.01 / math.sqrt(w.numel()) + 1e-6, name
        one = name.split(".")[-1] in {"conv2", "conv4", "conv5", "fc6", "fc7"}
        assert torch.equal(layer.bias, torch.full_like(layer.bias, 1.0 if one else 0.0)), name


def test_default_init_is_pytorchs_kaiming_uniform_not_the_papers_gaussian():
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=10, width=0.25, init="default"))
    conv2 = model.towers[0].conv2
    bound = 1 / math.sqrt(conv2.weight[0].numel())  # PyTorch's conv default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert conv2.weight.abs().max().item() <= bound
    assert conv2.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert conv2.bias.abs().max().item() <= bound and not torch.equal(conv2.bias, torch.ones_like(conv2.bias))
    with pytest.raises(ValueError, match="init"):
        AlexNetConfig(init="xavier")


@pytest.mark.slow
def test_a_few_sgd_steps_on_cpu_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(AlexNetConfig(width=SMALL, num_classes=10), ["cpu", "cpu"])
    x, y = torch.randn(4, 3, 224, 224), torch.tensor([0, 3, 5, 7])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    before = eval_loss()
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert eval_loss() < before - 0.3


def test_config_round_trips_through_plain_json():
    config = AlexNetConfig(num_classes=37, width=0.5, crop=227, dropout=0.3, lrn_convention="caffe")
    again = AlexNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert AlexNetConfig(width=1).to_dict() == AlexNetConfig(width=1.0).to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        AlexNetConfig.from_dict({**config.to_dict(), "depth": 8})
    with pytest.raises(ValueError, match="lrn_convention"):
        AlexNetConfig(lrn_convention="torch")


def test_width_scales_every_channel_count_with_a_minimum_of_one():
    tower = AlexNet(AlexNetConfig(width=0.01, num_classes=3)).towers[0]
    assert [tower.conv1.out_channels, tower.conv2.out_channels, tower.conv3.out_channels,
            tower.conv5.out_channels, tower.fc6.out_features] == [1, 1, 2, 1, 20]


@pytest.mark.slow
def test_channels_last_and_torch_compile_give_the_eager_output():
    model = randomize_(AlexNet(AlexNetConfig(width=SMALL, num_classes=10))).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: no graph breaks
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)
        model = model.to(memory_format=torch.channels_last)
        assert model.towers[1].conv2.weight.is_contiguous(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dropout_zeroes_the_outputs_of_fc6_and_fc7_in_training_not_the_conv_features():
    """§4.2 / Caffe's drop6, drop7 (torchvision instead drops fc6's inputs). Under the paper's init the ReLU
    inputs of conv5, fc6, fc7 are about 1 (bias 1), so nearly all zeros are dropout's."""
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(width=SMALL, num_classes=10))
    inputs: dict[str, list[torch.Tensor]] = {"fc6": [], "fc7": [], "fc8": []}
    for name, layer in [("fc6", model.towers[0].fc6), ("fc7", model.towers[0].fc7), ("fc8", model.fc8)]:
        layer.register_forward_hook(lambda m, args, out, name=name: inputs[name].append(args[0]))
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        model.train()(x)
        model.eval()(x)
    (fc6_train, fc6_eval), (fc7_train, fc7_eval), (fc8_train, fc8_eval) = inputs.values()
    assert (fc6_train == 0).float().mean() < 0.05
    for train, evaluated in [(fc7_train, fc7_eval), (fc8_train, fc8_eval)]:
        assert 0.4 < (train == 0).float().mean() < 0.6
        assert (evaluated == 0).float().mean() < 0.05


MODEL_FIELDS = {f.name for f in fields(AlexNetConfig)}
MODEL_SWITCHES = [v.changes for v in VARIANTS if v.changes and set(v.changes) <= MODEL_FIELDS]


@pytest.mark.parametrize("changes", [{}, {"crop": 227}, {"crop": 112}, {"width": 0.25, "num_classes": 10},
                                     *MODEL_SWITCHES],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "paper")
def test_forward_flops_of_every_switch_agree_with_torchs_flop_counter(changes):
    """MFU divides by these: counted from the built module, so the one-tower net (§3.2) gets its own 783 MFLOPs."""
    config = AlexNetConfig(**{"width": 0.5, **changes} if changes.keys() - {"crop"} else changes)
    if not changes:
        assert forward_flops(config) == 1_448_813_632  # the hand count of the paper's net (2 per multiply-add)
    if changes == {"towers": 1}:
        assert forward_flops(replace(config, width=1.0)) == 783_028_768
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        AlexNet(config).eval()(torch.zeros(2, 3, config.crop, config.crop))
    assert counter.get_total_flops() == 2 * forward_flops(config)
