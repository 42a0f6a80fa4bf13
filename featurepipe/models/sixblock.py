"""The custom CNN: six conv–BN–ReLU blocks with growing width, global average pooling."""

from __future__ import annotations

import torch
from torch import nn


class SixBlock(nn.Module):
    """Maps (N, C, H, W) floats to a pooled (N, widths[-1]) embedding; works from 28 px to 224 px and up.

    Each block halves the resolution while the map is at least `min_pool` pixels wide, so small inputs
    (28 px) keep a 7x7 map for the deep blocks instead of collapsing to 1x1, and large inputs
    (224 px) are pooled down early where convolutions are cheap.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 96, 128, 192, 256),
                 min_pool: int = 8) -> None:
        super().__init__()
        chans = (in_channels, *widths)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )
            for cin, cout in zip(chans[:-1], chans[1:])
        )
        self.pool = nn.MaxPool2d(2)
        self.min_pool = min_pool
        self.out_dim = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every block (after its pooling), for callers that want more than the last."""
        maps = []
        for block in self.blocks:
            x = block(x)
            if x.shape[-1] >= self.min_pool and x.shape[-2] >= self.min_pool:
                x = self.pool(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x)[-1].mean(dim=(2, 3))
