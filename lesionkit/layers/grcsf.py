"""GRCSF's two compensation units (Sec. 3.2-3.3), as layers a U-shaped network can use.

- :class:`GlobalCompensationUnit` (GCU, Eq. 1-2) re-weights a skip feature F where the
  down-sampled feature S, re-upscaled to F's size (RU) and gated by the SE-weighted decoder
  feature U, disagrees with SE(F): R = CS(RU * SE(U), SE(F)), C = R * F + F.
- :class:`RegionalCompensationUnit` (RCU, Eq. 6) fuses two residual maps into a decoder
  feature U by patch cross-attention (:func:`lesionkit.kernels.patch_cross_attention`) scaled by
  a per-patch importance score: M = W1 * proj(attn(RM1) * phi) + W2 * proj(attn(RM2) * phi) + U.

Choices of ours where the paper is silent (each a constructor argument): S and U are brought to
F's channel count by 1x1 convolutions before the cosine similarity; SE uses reduction 16; in
the RCU, queries come from U and keys from the residual map (SAGAN-style 1x1 projections,
query/key width C / 8), values from U, so the residual maps decide where inside a patch U's
features are gathered from; W1 and W2 start at 0 as SAGAN's gamma (the unit starts as the
identity).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.kernels import patch_cross_attention


class SqueezeExcitation(nn.Module):
    """Channel re-weighting x * sigmoid(FC(ReLU(FC(mean over H, W))))."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class GlobalCompensationUnit(nn.Module):
    """GCU (GRCSF Eq. 1-2). forward(F, S, U) -> (C, R) with C like F and R (B, 1, H, W).

    Args:
        skip_channels: channels of the skip feature F (B, Cf, H, W).
        down_channels: channels of the down-sampled feature S (B, Cs, H / 2, W / 2).
        up_channels: channels of the up-sampled decoder feature U (B, Cu, H, W).
    """

    def __init__(self, skip_channels: int, down_channels: int, up_channels: int,
                 se_reduction: int = 16) -> None:
        super().__init__()
        self.align_down = nn.Conv2d(down_channels, skip_channels, 1)
        self.align_up = nn.Conv2d(up_channels, skip_channels, 1)
        self.se_skip = SqueezeExcitation(skip_channels, se_reduction)
        self.se_up = SqueezeExcitation(skip_channels, se_reduction)

    def forward(self, skip: torch.Tensor, down: torch.Tensor,
                up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = skip.shape[-2:]
        if up.shape[-2:] != size:
            raise ValueError(f"up should have the skip feature's size {tuple(size)}, got "
                             f"{tuple(up.shape[-2:])}")
        re_up = F.interpolate(self.align_down(down), size=size, mode="bilinear", align_corners=False)
        gated = re_up * self.se_up(self.align_up(up))
        residual = F.cosine_similarity(gated, self.se_skip(skip), dim=1, eps=1e-6).unsqueeze(1)  # Eq. 1
        return residual * skip + skip, residual  # Eq. 2


class PatchImportance(nn.Module):
    """phi of GRCSF Fig. 5: 1x1 conv to one map, then per P x P patch FC-ReLU, FC-ReLU, FC,
    sigmoid; returns the score of each patch broadcast to its pixels (B, 1, H, W)."""

    def __init__(self, channels: int, patch_size: int, hidden: int = 64) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.reduce = nn.Conv2d(channels, 1, 1)
        area = patch_size * patch_size
        self.mlp = nn.Sequential(nn.Linear(area, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        patches = self.reduce(x).reshape(b, rows, p, cols, p).permute(0, 1, 3, 2, 4)
        score = self.mlp(patches.reshape(b, rows, cols, p * p))  # (B, rows, cols, 1)
        return score.permute(0, 3, 1, 2).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)


class RegionalCompensationUnit(nn.Module):
    """RCU (GRCSF Eq. 6). forward(U, residual_maps) -> M like U.

    Args:
        channels: channels C of the decoder feature U (B, C, H, W).
        patch_size: window side P of the cross-attention and the importance score; H and W of
            U must be multiples of it.
        residual_channels: channels of each residual map (1 for grayscale, 3 for RGB); the
            maps are resized to U's size.
        num_maps: residual maps fused (2: mask ratios 0.5 and 0.75).
        heads: attention heads; the query/key width is max(1, C // 8) per head.
        importance: scale the attention by the per-patch score phi (False: phi = 1, the
            "w/o Importance Score" ablation of GRCSF Table 3).
    """

    def __init__(self, channels: int, patch_size: int, residual_channels: int = 1,
                 num_maps: int = 2, heads: int = 1, score_hidden: int = 64,
                 importance: bool = True) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels should be divisible by heads, got channels={channels}, "
                             f"heads={heads}")
        self.patch_size, self.heads = patch_size, heads
        self.key_width = max(1, channels // 8 // heads) * heads
        self.query = nn.Conv2d(channels, self.key_width, 1)
        self.keys = nn.ModuleList(nn.Conv2d(residual_channels, self.key_width, 1) for _ in range(num_maps))
        self.value = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)  # the outer projection of Eq. 6
        self.importance = PatchImportance(channels, patch_size, score_hidden) if importance else None
        self.weights = nn.Parameter(torch.zeros(num_maps))  # W1, W2

    def forward(self, feature: torch.Tensor, residual_maps: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(residual_maps) != len(self.keys):
            raise ValueError(f"residual_maps should hold {len(self.keys)} maps, got {len(residual_maps)}")
        b, c, height, width = feature.shape
        h = self.heads
        query = self.query(feature).reshape(b, h, -1, height, width)
        value = self.value(feature).reshape(b, h, -1, height, width)
        score = self.importance(feature) if self.importance is not None else None
        fused = feature
        for weight, key_proj, rm in zip(self.weights, self.keys, residual_maps):
            rm = F.interpolate(rm.to(feature.dtype), size=(height, width), mode="bilinear",
                               align_corners=False)
            key = key_proj(rm).reshape(b, h, -1, height, width)
            attended = patch_cross_attention(query, key, value, self.patch_size).reshape(b, c, height, width)
            fused = fused + weight * self.out(attended if score is None else attended * score)
        return fused


__all__ = ["GlobalCompensationUnit", "PatchImportance", "RegionalCompensationUnit", "SqueezeExcitation"]
