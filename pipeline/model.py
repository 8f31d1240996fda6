"""AlexNet as printed in Krizhevsky, Sutskever & Hinton, NIPS 2012 ("the paper"): two towers, cross-tower
layers, a device map. Read `AlexNet.forward` next to the paper's Figure 2.

Section numbers in comments are the paper's. `AlexNetGrouped` is the same function written as one column with
`groups=2` (Caffe's formulation); tests prove the two agree, and the benchmark compares their speed.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import AlexNetConfig
from pipeline.errors import PipeError

# §5: "We initialized the neuron biases in the second, fourth, and fifth convolutional layers, as well as in
# the fully-connected hidden layers, with the constant 1 ... the remaining layers with the constant 0."
BIAS_ONE = frozenset({"conv2", "conv4", "conv5", "fc6", "fc7"})


def local_response_norm(config: AlexNetConfig) -> nn.LocalResponseNorm:
    """§3.3: b = a / (k + α Σ_j a_j²)^β over n maps centred on a's, clipped at the edges.

    torch's LocalResponseNorm (like Caffe and cuda-convnet2) divides α by n, so the formula as printed needs
    alpha=α·n; convention "caffe" hands α over unchanged (an effective α of 1e-4/5)."""
    alpha = config.lrn_alpha * config.lrn_size if config.lrn_convention == "paper" else config.lrn_alpha
    return nn.LocalResponseNorm(config.lrn_size, alpha=alpha, beta=config.lrn_beta, k=config.lrn_k)


def joined(maps: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The towers' maps side by side [A, B] on `device`: the only place a tensor crosses between GPUs (§3.2).
    Always called, also when both towers share a device (then `.to` returns the tensor itself)."""
    return torch.cat([m.to(device, non_blocking=True) for m in maps], dim=1)


def activation(config: AlexNetConfig):
    """§3.1: ReLU, f(x) = max(0, x); tanh is the saturating neuron it is compared with (Figure 1)."""
    return F.relu if config.activation == "relu" else torch.tanh


def norm_layer(config: AlexNetConfig, channels: int) -> nn.Module:
    """What follows the ReLU of conv1 and conv2: LRN (§3.3), nothing, or BatchNorm2d in its place (a later
    normalization, swapped in like for like; not in the paper)."""
    if config.norm == "lrn":
        return local_response_norm(config)
    return nn.BatchNorm2d(channels) if config.norm == "batch" else nn.Identity()


def max_pool(config: AlexNetConfig) -> nn.MaxPool2d:
    """§3.4: overlapping z=3, s=2, or plain z=2, s=2; both take 55 → 27 → 13 → 6 (other crops: `map_sides`)."""
    return nn.MaxPool2d(3, stride=2) if config.pool == "overlap" else nn.MaxPool2d(2, stride=2)


class Tower(nn.Module):
    """One GPU's half of the net (§3.2, Figure 2). conv3, fc6, fc7 read every tower; the rest, this one.

    With `config.towers == 1` the one tower is §3.2's one-GPU comparison net (its footnote): half the kernels of
    the two-GPU net in conv1–conv4, conv5 and the fully-connected layers at the full two-GPU size."""

    def __init__(self, config: AlexNetConfig):
        super().__init__()
        c, n = config.channels, config.towers
        conv5, fc = c(128) * (3 - n), c(2048) * (3 - n)  # two towers: 128 and 2048 each; one: 256 and 4096
        self.conv1 = nn.Conv2d(3, c(48), 11, stride=4, padding=config.conv1_padding)
        self.conv2 = nn.Conv2d(c(48), c(128), 5, padding=2)
        self.conv3 = nn.Conv2d(n * c(128), c(192), 3, padding=1)  # over every tower's conv2 maps
        self.conv4 = nn.Conv2d(c(192), c(192), 3, padding=1)
        self.conv5 = nn.Conv2d(c(192), conv5, 3, padding=1)
        self.fc6 = nn.Linear(n * conv5 * config.pool5_side**2, fc)  # every tower's pooled conv5 maps (6x6 at 224)
        self.fc7 = nn.Linear(n * fc, fc)  # over every tower's fc6
        self.norm1, self.norm2 = norm_layer(config, c(48)), norm_layer(config, c(128))  # §3.3: after the ReLU
        self.pool = max_pool(config)
        self.act = activation(config)

    def conv1_2(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.norm1(self.act(self.conv1(x))))
        return self.pool(self.norm2(self.act(self.conv2(x))))

    def conv3_5(self, x_all: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv3(x_all))
        x = self.act(self.conv4(x))
        return torch.flatten(self.pool(self.act(self.conv5(x))), 1)


class AlexNet(nn.Module):
    """The paper's net: towers A and B, each on its own device after `place`, crossing only at conv3, fc6, fc7
    and fc8 (or §3.2's one-GPU net: one tower). Dropout follows the ReLU of fc6 and fc7 (§4.2 and Caffe's
    drop6/drop7). torchvision instead drops the inputs of fc6 and fc7, which is not the same net, so we do not
    follow it."""

    def __init__(self, config: AlexNetConfig):
        super().__init__()
        self.config = config
        # registered as an nn.ModuleList, typed as what it holds (torch types a ModuleList's items as Module)
        self.towers = typing.cast(Sequence[Tower], nn.ModuleList([Tower(config) for _ in range(config.towers)]))
        self.fc8 = nn.Linear(sum(t.fc7.out_features for t in self.towers), config.num_classes)  # over every fc7
        self.dropout = nn.Dropout(config.dropout)
        if config.init == "paper":
            init_paper_(self, config.init_std)

    @property
    def devices(self) -> list[torch.device]:
        return [tower.conv1.weight.device for tower in self.towers]

    def place(self, devices: Sequence[str | torch.device]) -> AlexNet:
        """Tower A and fc8 on devices[0], tower B on devices[1] (or everything on the one device given)."""
        devs = [torch.device(d) for d in devices]
        if not 1 <= len(devs) <= len(self.towers):
            if len(self.towers) == 1:
                raise PipeError(f"towers=1 (the one-GPU net of §3.2) runs on one device; got the device map "
                                f"{','.join(map(str, devices))} (give --devices with one device)")
            raise ValueError(f"place() takes one or two devices (one per tower), got {list(devices)}")
        if len({d.type for d in devs}) != 1:  # non_blocking copies are only safe between devices of one kind
            raise ValueError(f"both towers must be on devices of one type, got {list(devices)}")
        for tower, device in zip(self.towers, (devs[0], devs[-1])):
            tower.to(device)
        self.fc8.to(devs[0])
        return self

    def forward(self, x: torch.Tensor, dropout_masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """x on devices[0] → logits on devices[0]. In training, `dropout_masks` (from `dropout_masks`) are §4.2's
        masks of this step; without them dropout draws from torch's global generator."""
        return self.fc8(self.features(x, dropout_masks))

    def features(self, x: torch.Tensor, dropout_masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The last hidden layer: every tower's fc7 after its ReLU (and dropout in training), on fc8's device."""
        a, *rest = self.towers
        on = [t.conv1.weight.device for t in self.towers]
        masks = list(dropout_masks) if dropout_masks and self.training else [None] * 2 * len(on)
        ys = [a.conv1_2(x), *(t.conv1_2(x.to(d, non_blocking=True)) for t, d in zip(rest, on[1:]))]
        ys = [t.conv3_5(joined(ys, d)) for t, d in zip(self.towers, on)]
        ys = [self.hidden(t.fc6, joined(ys, d), m) for t, d, m in zip(self.towers, on, masks[:len(on)])]
        ys = [self.hidden(t.fc7, joined(ys, d), m) for t, d, m in zip(self.towers, on, masks[len(on):])]
        return joined(ys, self.fc8.weight.device)

    def hidden(self, fc: nn.Linear, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.towers[0].act(fc(x))
        return y * mask if mask is not None else self.dropout(y)


DROPOUT_MASKS = 21  # seed-stream tag: (seed, step, layer, tower) never coincides with the loader's draws


@torch.no_grad()
def dropout_masks(model: AlexNet, seed: int, step: int, rows: slice, global_batch: int) -> tuple[torch.Tensor, ...]:
    """§4.2's dropout for one step, drawn for the whole global batch from a (seed, step, layer, tower) generator on
    each tower's device and sliced to this rank's `rows`: the same masks whatever the number of ranks (the
    model's forward takes them in fc6 then fc7 order, towers within). Each mask is 0 or 1/(1 − p), as dropout's
    scaling; none when p = 0."""
    p = model.config.dropout
    if p == 0:
        return ()
    masks = []
    for layer, name in enumerate(("fc6", "fc7")):
        for index, tower in enumerate(model.towers):
            fc = getattr(tower, name)
            key = np.random.SeedSequence([seed, step, layer, index, DROPOUT_MASKS]).generate_state(1)[0]
            generator = torch.Generator(device=fc.weight.device).manual_seed(int(key))
            draw = torch.rand(global_batch, fc.out_features, generator=generator, device=fc.weight.device)[rows]
            masks.append((draw >= p).to(fc.weight.dtype) / (1 - p))
    return tuple(masks)


@torch.no_grad()
def init_paper_(model: nn.Module, std: float) -> None:
    """§5: every weight from N(0, std); biases 1 in conv2, conv4, conv5, fc6, fc7 (to give the ReLUs positive
    inputs early on), 0 elsewhere. Layers are recognized by their name's last part."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            assert module.bias is not None  # every conv and fc layer here has one
            module.weight.normal_(0.0, std)
            module.bias.fill_(1.0 if name.rsplit(".", 1)[-1] in BIAS_ONE else 0.0)


def build_model(config: AlexNetConfig, devices: Sequence[str | torch.device] = ("cpu",)) -> AlexNet:
    return AlexNet(config).place(devices)


def initial_model(config: AlexNetConfig, seed: int, devices: Sequence[str | torch.device] = ("cpu",)) -> AlexNet:
    """The weights a run with `seed` starts from (`pipeline.train.prepare` seeds and builds alike), drawn without
    disturbing the caller's random state: eval compares Figure 3's kernels with them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config, devices)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(config: AlexNetConfig) -> int:
    """Forward FLOPs per image of the net `config` builds (2 per multiply-add of its conv and fc layers; ReLU, LRN,
    pooling and biases are noise beside them): what MFU divides by. Counted from the layers' output shapes in one
    pass on the meta device (no memory, no weights), so every switch is counted as built: 1,448,813,632 for the
    paper's net at 224, 783,028,768 for §3.2's one-tower net (torch's FlopCounterMode counts the same)."""
    with torch.device("meta"):
        model = AlexNet(replace(config, init="default")).eval()  # meta tensors: no init to run
    total = 0

    def count(module: nn.Conv2d | nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += 2 * output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            total += 2 * output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(torch.empty(1, 3, config.crop, config.crop, device="meta"))
    for hook in hooks:
        hook.remove()
    return total
