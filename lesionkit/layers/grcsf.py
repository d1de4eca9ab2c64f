"""GRCSF's two compensation units (Sec. 3.2-3.3), as layers a U-shaped network can use.

- :class:`GlobalCompensationUnit` (GCU, Eq. 1-2) re-weights a skip feature F where the
  down-sampled feature S, re-upscaled to F's size (RU) and gated by the SE-weighted decoder
  feature U, disagrees with SE(F): R = CS(RU * SE(U), SE(F)), C = R * F + F.
- :class:`RegionalCompensationUnit` (RCU, Eq. 6) fuses two residual maps into a decoder
  feature U by patch cross-attention scaled by a per-patch importance score:
  M = W1 * proj(attn(RM1) * phi) + W2 * proj(attn(RM2) * phi) + U. Both maps' attentions share
  U's queries and values, so they run as one op
  (:func:`lesionkit.kernels.patch_cross_attention_mix`: (W1 P1 + W2 P2) V, V multiplied once).

Choices of ours where the paper is silent (each a constructor argument): S and U are brought to
F's channel count by 1x1 convolutions before the cosine similarity; SE uses reduction 16; in
the RCU, queries come from U and keys from the residual map (SAGAN-style 1x1 projections,
query/key width C / 8; keys from each map embedded to C channels first), values from U, so the
residual maps decide where inside a patch U's features are gathered from; each map is
standardised per image; W1 and W2 start at 0.1, so the maps move the output from the first step
(see :class:`RegionalCompensationUnit` for the reasons and the switches back).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.kernels import gcu_compensate, patch_cross_attention_mix


class _SpatialMean(torch.autograd.Function):
    """x.mean(dim=(2, 3)) whose gradient is materialised in x's memory layout.

    Autograd's gradient of a mean is a broadcast view; added to the gradient x gets from its
    other uses, that view costs about 10x a same-layout add on bf16 channels-last tensors
    (5.7 against 0.6 ms for (8, 16, 128, 128) on one CPU thread, materialising included)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.dtype = x.shape, x.dtype
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        # Summed in float32 (float64 for float64) and rounded once: a bf16 mean over a
        # channels-last tensor took 2.4x longer (1.11 against 0.46 ms for (8, 16, 128, 128),
        # one thread), and its value is the same float32 sum rounded to bf16.
        return x.mean(dim=(2, 3), dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        b, c, h, w = ctx.shape
        grad = (grad / (h * w)).to(ctx.dtype)
        if ctx.channels_last:
            return grad[:, None, None, :].expand(b, h, w, c).contiguous().permute(0, 3, 1, 2)
        return grad[:, :, None, None].expand(b, c, h, w).contiguous()


class SqueezeExcitation(nn.Module):
    """Channel re-weighting x * sigmoid(FC(ReLU(FC(mean over H, W))))."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C) channel weights of ``x``."""
        return self.fc(_SpatialMean.apply(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)[:, :, None, None]


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
        aligned = self.align_up(up)
        # Eq. 1-2 in one pass over the pixels: R = CS(RU * SE(U), SE(F)), C = R * F + F, with
        # the products and the cosine in float32 (lesionkit.kernels.gcu_compensate).
        compensated, residual = gcu_compensate(re_up.to(skip.dtype), aligned.to(skip.dtype),
                                               self.se_up.weights(aligned), skip, self.se_skip.weights(skip))
        # R in F's dtype, so that the later skips it re-weights stay in it.
        return compensated, residual.to(skip.dtype)


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


MAP_NORMS = ("image", "none")
KEY_EMBEDS = ("conv", "linear")


def standardise_per_image(rm: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """(B, C, H, W) maps to zero mean and unit standard deviation per image and channel; the
    standard deviation is floored at ``eps`` so a flat map stays near zero instead of turning
    its noise into unit-size keys."""
    mean = rm.mean(dim=(-2, -1), keepdim=True)
    std = rm.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (rm - mean) / std.clamp_min(eps)


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
        gate_init: start value of W1, W2. Non-zero (default 0.1) so the maps reach the output
            from the first step: at 0 (SAGAN's gamma) the unit starts as the identity, but W
            multiplies every gradient reaching the projections, so they barely move in a short
            run. ``gate_lr_scale`` multiplies W's learning rate (read by the optimiser builder).
        map_norm: "image" standardises each map per image (zero mean, unit deviation) before
            the keys, so the attention sees where a map is high within the image, not its raw
            scale (about [0, 0.3] from an MAE); "none" uses the map as it is.
        key_embed: "conv" embeds each map to C channels (3x3 conv, GELU) before the key
            projection, as the patched RM' in R^{N x P^2 x C} implies; "linear" projects the
            map straight to the key width (a 1x1 conv of a one-channel map: every key is
            a * RM + b, so the attention inside a patch is a one-parameter family).
    """

    def __init__(self, channels: int, patch_size: int, residual_channels: int = 1,
                 num_maps: int = 2, heads: int = 1, score_hidden: int = 64,
                 importance: bool = True, gate_init: float = 0.1, gate_lr_scale: float = 1.0,
                 map_norm: str = "image", key_embed: str = "conv") -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels should be divisible by heads, got channels={channels}, "
                             f"heads={heads}")
        if map_norm not in MAP_NORMS:
            raise ValueError(f"map_norm should be one of {MAP_NORMS}, got {map_norm!r}")
        if key_embed not in KEY_EMBEDS:
            raise ValueError(f"key_embed should be one of {KEY_EMBEDS}, got {key_embed!r}")
        if not gate_lr_scale > 0:
            raise ValueError(f"gate_lr_scale should be > 0, got {gate_lr_scale}")
        self.patch_size, self.heads, self.map_norm = patch_size, heads, map_norm
        self.key_width = max(1, channels // 8 // heads) * heads

        def key(in_ch: int) -> nn.Module:
            if key_embed == "linear":
                return nn.Conv2d(in_ch, self.key_width, 1)
            return nn.Sequential(nn.Conv2d(in_ch, channels, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(channels, self.key_width, 1))

        self.query = nn.Conv2d(channels, self.key_width, 1)
        self.keys = nn.ModuleList(key(residual_channels) for _ in range(num_maps))
        self.value = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)  # the outer projection of Eq. 6
        self.importance = PatchImportance(channels, patch_size, score_hidden) if importance else None
        self.weights = nn.Parameter(torch.full((num_maps,), float(gate_init)))  # W1, W2
        if gate_lr_scale != 1.0:
            self.weights._lr_scale = float(gate_lr_scale)

    def forward(self, feature: torch.Tensor, residual_maps: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(residual_maps) != len(self.keys):
            raise ValueError(f"residual_maps should hold {len(self.keys)} maps, got {len(residual_maps)}")
        b, c, height, width = feature.shape
        h = self.heads
        # Views of the projections in U's layout: the attention reads them through their strides
        # and writes its output (and their gradients) in the same layout, so a channels-last U
        # makes no layout copy here (docs/grcsf.md, "Cost").
        query = self.query(feature).reshape(b, h, -1, height, width)
        value = self.value(feature).reshape(b, h, -1, height, width)
        keys = []
        for key_proj, rm in zip(self.keys, residual_maps):
            rm = rm.float()
            if self.map_norm == "image":  # at the map's own size, before resizing
                rm = standardise_per_image(rm)
            rm = F.interpolate(rm, size=(height, width), mode="bilinear",
                               align_corners=False).to(feature.dtype)
            keys.append(key_proj(rm).reshape(b, h, -1, height, width))
        # sum_m W_m attn(Q, K_m, V) = (sum_m W_m P_m) V: both maps in one op, V multiplied once.
        mixed = patch_cross_attention_mix(query, torch.stack(keys), value, self.weights, self.patch_size)
        if self.importance is not None:
            # phi is one number per patch and the attention stays inside a patch, so
            # attn(Q, K, V * phi) = attn(Q, K, V) * phi: scale the sum over the maps once.
            mixed = mixed * self.importance(feature).reshape(b, 1, 1, height, width).to(mixed.dtype)
        # sum_m W_m * out(A_m) = out's weights applied once to sum_m W_m * A_m, plus sum_m W_m * bias.
        mixed = mixed.reshape(b, c, height, width).to(feature.dtype)
        bias = None if self.out.bias is None else self.out.bias * self.weights.sum()
        return feature + F.conv2d(mixed, self.out.weight.to(feature.dtype), None if bias is None else bias.to(feature.dtype))


__all__ = ["KEY_EMBEDS", "MAP_NORMS", "GlobalCompensationUnit", "PatchImportance", "RegionalCompensationUnit",
           "SqueezeExcitation", "standardise_per_image"]
