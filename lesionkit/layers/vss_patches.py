"""VM-UNet's resolution changes, channels-last (B, H, W, C): patch embedding, 2x2 merging, 2x
expanding and the final 4x expand. Module and parameter names follow VM-UNet's so that its
checkpoints load unchanged."""

from __future__ import annotations

import torch
from torch import nn

from lesionkit.layers.layer_norm import LayerNorm


def _pixel_unshuffle_channels_last(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, H, W, s*s*c) -> (B, s*H, s*W, c), channel index laid out as (p1, p2, c)."""
    batch, height, width, channels = x.shape
    c = channels // (scale * scale)
    x = x.view(batch, height, width, scale, scale, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height * scale, width * scale, c)


class PatchEmbed2D(nn.Module):
    """(B, C_in, H, W) -> (B, H/p, W/p, C): p x p conv with stride p, then LayerNorm."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C): the 2x2 neighbours concatenated, LayerNorm(4C), Linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, _ = x.shape
        if height % 2 or width % 2:
            raise ValueError(f"PatchMerging2D needs an even height and width, got {height}x{width}")
        # Swin's order: (0, 0), (1, 0), (0, 1), (1, 1) - the pretrained reduction weights expect it.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand2D(nn.Module):
    """(B, H, W, 2C) -> (B, 2H, 2W, C): Linear 2C -> 4C (no bias), 2x2 rearrange, LayerNorm(C).

    ``dim`` is the output width C, as in VM-UNet (whose decoder stage of width C holds it).
    """

    def __init__(self, dim: int, dim_scale: int = 2) -> None:
        super().__init__()
        self.dim = 2 * dim
        self.dim_scale = dim_scale
        self.expand = nn.Linear(self.dim, dim_scale * self.dim, bias=False)
        self.norm = LayerNorm(self.dim // dim_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_pixel_unshuffle_channels_last(self.expand(x), self.dim_scale))


class FinalPatchExpand2D(nn.Module):
    """(B, H, W, C) -> (B, 4H, 4W, C/4): Linear C -> 4C (no bias), 4x4 rearrange, LayerNorm(C/4)."""

    def __init__(self, dim: int, dim_scale: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.dim_scale = dim_scale
        self.expand = nn.Linear(dim, dim_scale * dim, bias=False)
        self.norm = LayerNorm(dim // dim_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_pixel_unshuffle_channels_last(self.expand(x), self.dim_scale))

    def forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, C/4, 4H, 4W): ``forward`` followed by a permute to channels-first,
        computed the other way round. The LayerNorm over C/4 channels (6 in ``vmunet_tiny``)
        has one row per output pixel; PyTorch's kernel is slow on such short rows (and slower
        in bfloat16), so after the rearrangement the statistics are taken over dim 1 with plain
        reductions, in float32 (then back to the input's dtype). Same values as ``forward``."""
        batch, height, width, _ = x.shape
        s, c = self.dim_scale, self.dim // self.dim_scale
        y = self.expand(x).view(batch, height, width, s, s, c).permute(0, 5, 1, 3, 2, 4)
        y = y.reshape(batch, c, height * s, width * s).float()
        mean = y.mean(1, keepdim=True)
        y = y - mean
        y = y * torch.rsqrt(y.square().mean(1, keepdim=True) + self.norm.eps)
        return (y * self.norm.weight.view(1, c, 1, 1) + self.norm.bias.view(1, c, 1, 1)).to(x.dtype)
