"""UNet++ (Zhou et al. 2018): U-Net with nested, dense skip pathways; GRCSF's backbone.

Node x[i][j] (level i, column j) is a VGG block (3x3 conv with bias -> BN -> ReLU, twice) over
the concatenation of every earlier node of its level x[i][0..j-1] and the bilinear upsampling of
x[i+1][j-1]. Column 0 is the encoder. The paper-size default, widths (64, 128, 256, 512, 1024),
has 36,628,481 parameters at 1 input and 1 output channel (the 36.63M of GRCSF's Table 1) and
36,629,633 at 3 input channels. Deep supervision puts a 1x1 head on x[0][1..4]; the logits are
then the mean of the four heads (their individual logits are in the output's extras).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.models.output import SegmentationOutput
from lesionkit.models.registry import build_config, register_model


@dataclass
class UNetPlusPlusConfig:
    in_chans: int = 3
    num_classes: int = 1
    # Channels per level, top to bottleneck; len(widths) - 1 poolings and as many decoder columns.
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    deep_supervision: bool = False
    # Bilinear upsampling as in the UNet++ reference code (align_corners=True there); ours.
    align_corners: bool = True
    # Convolution weights: "he" = He et al.'s normal initialisation (fan-in, ReLU gain) with zero
    # biases, as GRCSF's implementation details and the UNet++ reference code do; "torch" keeps
    # PyTorch's default (uniform, non-zero biases), lesionkit's before December 2026.
    conv_init: str = "he"

    def __post_init__(self) -> None:
        if self.conv_init not in CONV_INITS:
            raise ValueError(f"conv_init should be one of {CONV_INITS}, got {self.conv_init!r}")
        if len(self.widths) < 2 or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"widths should list >= 2 positive channel counts, got {self.widths}")
        if self.in_chans < 1 or self.num_classes < 1:
            raise ValueError(f"in_chans and num_classes should be >= 1, got {self.in_chans} and "
                             f"{self.num_classes}")


CONV_INITS = ("he", "torch")


def init_convs(module: nn.Module, how: str) -> None:
    """Every nn.Conv2d under ``module``: He normal weights (fan-in, ReLU gain) and zero biases for
    ``how="he"``; left as built for ``"torch"``."""
    if how == "torch":
        return
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class VGGBlock(nn.Sequential):
    """(3x3 conv with bias -> BN -> ReLU) twice, UNet++'s node."""

    def __init__(self, cin: int, cmid: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cmid, 3, padding=1), nn.BatchNorm2d(cmid), nn.ReLU(inplace=True),
            nn.Conv2d(cmid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class UNetPlusPlus(nn.Module):
    """Nested U-Net; returns logits (B, num_classes, H, W), or a SegmentationOutput whose
    extras hold every head's logits when deep supervision is on."""

    def __init__(self, cfg: UNetPlusPlusConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = [int(c) for c in cfg.widths]
        depth = len(w) - 1
        # nodes[i][j] is x[i][j]; level i has depth - i + 1 nodes.
        self.nodes = nn.ModuleList()
        for i in range(depth + 1):
            level = nn.ModuleList()
            level.append(VGGBlock(cfg.in_chans if i == 0 else w[i - 1], w[i], w[i]))
            for j in range(1, depth - i + 1):
                level.append(VGGBlock(w[i] * j + w[i + 1], w[i], w[i]))
            self.nodes.append(level)
        n_heads = depth if cfg.deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv2d(w[0], cfg.num_classes, 1) for _ in range(n_heads))
        self.reduction = 2 ** depth
        init_convs(self, cfg.conv_init)

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=self.cfg.align_corners)

    def forward(self, x: torch.Tensor) -> torch.Tensor | SegmentationOutput:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"x should be (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.reduction or w % self.reduction:
            raise ValueError(f"input height and width should be multiples of {self.reduction} "
                             f"for this UNet++, got {h}x{w}")
        depth = len(self.nodes) - 1
        grid: list[list[torch.Tensor]] = [[] for _ in range(depth + 1)]
        for i in range(depth + 1):  # encoder column, then each anti-diagonal of decoder nodes
            grid[i].append(self.nodes[i][0](x if i == 0 else F.max_pool2d(grid[i - 1][0], 2)))
            for j in range(1, i + 1):
                level = i - j
                inputs = grid[level] + [self._up(grid[level + 1][j - 1])]
                grid[level].append(self.nodes[level][j](torch.cat(inputs, dim=1)))
        if not self.cfg.deep_supervision:
            return self.heads[0](grid[0][depth])
        logits = [head(grid[0][j + 1]) for j, head in enumerate(self.heads)]
        extras = {f"deep_supervision_{j + 1}": out for j, out in enumerate(logits)}
        return SegmentationOutput(torch.stack(logits).mean(dim=0), extras)


def _unetpp(name: str, defaults: dict, kwargs: dict) -> UNetPlusPlus:
    return UNetPlusPlus(build_config(UNetPlusPlusConfig, defaults, kwargs, name))


@register_model
def unetpp(**kwargs) -> UNetPlusPlus:
    """UNet++, paper size: 36,628,481 parameters at 1 input / 1 output channel (GRCSF Table 1)."""
    return _unetpp("unetpp", {}, kwargs)


@register_model
def unetpp_tiny(**kwargs) -> UNetPlusPlus:
    """Narrow 5-level UNet++ (widths 16..256) for 128-px input on a CPU."""
    return _unetpp("unetpp_tiny", {"widths": (16, 32, 64, 128, 256)}, kwargs)


__all__ = ["CONV_INITS", "UNetPlusPlus", "UNetPlusPlusConfig", "init_convs", "unetpp", "unetpp_tiny"]
