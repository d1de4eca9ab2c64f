"""TransUNet's Cascaded Upsampler (CUP, Chen et al. 2021), SegMAE's segmentation decoder.

A 3x3 conv turns the token grid into ``head_channels`` maps, then each stage upsamples x2
(bilinear), concatenates the encoder skip of that resolution (if any) and applies two
3x3 conv - BN - ReLU layers. With TransUNet's R50-ViT-B/16 choices (head 512, decoder
(256, 128, 64, 16), skips 512, 256, 64 and none at full resolution) it holds 7,387,200 parameters
before the segmentation head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias: batch norm follows) -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UpsampleBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.cskip = cskip
        self.conv1 = ConvBNReLU(cin + cskip, cout)
        self.conv2 = ConvBNReLU(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if self.cskip:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class CascadedUpsampler(nn.Module):
    """(B, in_channels, h, w) + skips -> (B, decoder_channels[-1], h * 2**stages, w * 2**stages)."""

    def __init__(self, in_channels: int, head_channels: int, decoder_channels: Sequence[int],
                 skip_channels: Sequence[int]) -> None:
        super().__init__()
        if len(skip_channels) != len(decoder_channels):
            raise ValueError(f"skip_channels should have one entry per decoder stage ({len(decoder_channels)}), "
                             f"got {list(skip_channels)}; use 0 for a stage without skip")
        self.skip_channels = [int(c) for c in skip_channels]
        self.conv_more = ConvBNReLU(in_channels, head_channels)
        cins = [head_channels, *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(UpsampleBlock(ci, cs, co) for ci, cs, co in zip(cins, self.skip_channels, decoder_channels))

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``skips[i]`` feeds stage i (coarse to fine) and must be 2x the resolution of stage i's input."""
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            skip = skips[i] if i < len(skips) else None
            if block.cskip and (skip is None or skip.shape[1] != block.cskip):
                got = None if skip is None else tuple(skip.shape)
                raise ValueError(f"decoder stage {i} expects a skip with {block.cskip} channels, got {got}")
            x = block(x, skip if block.cskip else None)
        return x


__all__ = ["CascadedUpsampler", "ConvBNReLU", "UpsampleBlock"]
