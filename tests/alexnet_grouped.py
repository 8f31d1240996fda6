"""The paper's two-tower AlexNet written as Caffe's one-column net (bvlc_alexnet: `groups=2` on conv2, conv4, conv5):
the oracle the tests hold the two-tower model to (the same function given the same weights) and a baseline of the
training-step benchmark (bench/train.py). Not part of the library: nothing trains it."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model import AlexNet, AlexNetConfig, activation, init_paper_, local_response_norm, max_pool


class AlexNetGrouped(nn.Module):
    """The same function on one device as one column of 96/256/384/384/256 maps (Caffe's bvlc_alexnet):
    `groups=2` on conv2, conv4, conv5 keeps the halves apart; conv3 and the fc layers read everything.

    One difference from Caffe's prototxt: Caffe's LRN slides across all 96 (256) maps, so near the middle its
    window reaches into the other half; the paper's towers cannot see each other there, so we normalize each
    half on its own. Channel i < C/2 of every layer is tower A's channel i."""

    def __init__(self, config: AlexNetConfig):
        super().__init__()
        if config.towers != 2 or config.norm != "lrn":
            raise ValueError(f"the grouped twin is the two-tower net with LRN; got towers={config.towers}, "
                             f"norm={config.norm}")
        self.config = config
        c = config.channels
        self.conv1 = nn.Conv2d(3, 2 * c(48), 11, stride=4, padding=config.conv1_padding)
        self.conv2 = nn.Conv2d(2 * c(48), 2 * c(128), 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(2 * c(128), 2 * c(192), 3, padding=1)
        self.conv4 = nn.Conv2d(2 * c(192), 2 * c(192), 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(2 * c(192), 2 * c(128), 3, padding=1, groups=2)
        self.fc6 = nn.Linear(2 * c(128) * 6 * 6, 2 * c(2048))
        self.fc7 = nn.Linear(2 * c(2048), 2 * c(2048))
        self.fc8 = nn.Linear(2 * c(2048), config.num_classes)
        self.lrn = local_response_norm(config)
        self.pool = max_pool(config)
        self.act = activation(config)
        self.dropout = nn.Dropout(config.dropout)
        if config.init == "paper":
            init_paper_(self, config.init_std)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lrn(half) for half in x.chunk(2, dim=1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.norm(self.act(self.conv1(x))))
        x = self.pool(self.norm(self.act(self.conv2(x))))
        x = self.act(self.conv3(x))
        x = self.act(self.conv4(x))
        x = torch.flatten(self.pool(self.act(self.conv5(x))), 1)
        x = self.dropout(self.act(self.fc6(x)))
        x = self.dropout(self.act(self.fc7(x)))
        return self.fc8(x)

    @torch.no_grad()
    def load_from_two_tower(self, model: AlexNet) -> AlexNetGrouped:
        """Copy `model`'s weights: each layer's tower A rows, then tower B's."""
        if model.config != self.config:
            raise ValueError(f"configs differ: two-tower {model.config} vs grouped {self.config}")
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
            mine, halves = getattr(self, name), [getattr(tower, name) for tower in model.towers]
            mine.weight.copy_(torch.cat([h.weight.to(mine.weight.device) for h in halves]))
            mine.bias.copy_(torch.cat([h.bias.to(mine.bias.device) for h in halves]))
        self.fc8.load_state_dict(model.fc8.state_dict())
        return self


def grouped_reference(model: AlexNet) -> AlexNetGrouped:
    """The one-column `groups=2` net holding `model`'s weights, on model's first device, dtype and mode."""
    like = model.fc8.weight
    grouped = AlexNetGrouped(model.config).to(like.device, like.dtype).load_from_two_tower(model)
    return grouped.train(model.training)
