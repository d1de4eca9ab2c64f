"""AMLP's pre-training network: the U-Net with a reconstruction head and a per-patch foreground head.

AMLP (Sec. 3) pre-trains a U-Net by reconstructing masked patches. :class:`AMLPUNet` is a
:class:`~lesionkit.models.unet.UNet` (same module names, so its ``stem`` / ``down`` / ``up`` /
``head`` weights load into ``unet`` / ``unet_tiny`` for fine-tuning) with:

- ``recon_head``: a 1x1 convolution from the last decoder features to the image's channels, the
  reconstruction of the pixels (trained on the masked patches);
- ``fg_head``: a 1x1 convolution on the encoder's patch features, one foreground logit per
  patch (the p_i of the category consistency loss, Sec. 3.3). The patch features are the
  deepest encoder level whose stride divides the patch size, average-pooled to the patch grid;
- masking: ``forward(x, patch_mask)`` sets the masked patches of the input to 0 (our choice,
  no learnable token: images are in [0, 1], so a masked patch is black).

The segmentation ``head`` is kept (the trainer freezes it while pre-training) so that the
checkpoint carries a whole U-Net and ``forward`` returns segmentation logits like every model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.layers.patch_masking import patch_mask_to_pixels
from lesionkit.models.output import SegmentationOutput
from lesionkit.models.registry import build_config, register_model
from lesionkit.models.unet import UNet, UNetConfig


@dataclass
class AMLPUNetConfig(UNetConfig):
    # Side of the square patches MPS masks; the input must be a multiple of it. The paper
    # divides the image into 256 patches: 16 px at 256 px, 8 px at 128 px.
    patch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size < 1:
            raise ValueError(f"patch_size should be >= 1, got {self.patch_size}")


class AMLPUNet(UNet):
    """U-Net + reconstruction head + per-patch foreground head (AMLP pre-training)."""

    def __init__(self, cfg: AMLPUNetConfig) -> None:
        super().__init__(cfg)
        w = [int(c) for c in cfg.widths]
        # Deepest level whose stride (2 ** level) divides the patch size: whole cells per patch.
        self.patch_level = max(i for i in range(len(w)) if cfg.patch_size % (2 ** i) == 0)
        self.recon_head = nn.Conv2d(w[0], cfg.in_chans, 1)
        self.fg_head = nn.Conv2d(w[self.patch_level], 1, 1)

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        p = self.cfg.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"input height and width should be multiples of patch_size {p}, got {h}x{w}")
        return h // p, w // p

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"x should be (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.reduction or w % self.reduction:
            raise ValueError(f"input height and width should be multiples of {self.reduction} for this U-Net, got {h}x{w}")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        return skips

    def patch_features(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """(B, C, H/p, W/p) encoder features per patch: level ``patch_level`` average-pooled to the grid."""
        cells = self.cfg.patch_size // (2 ** self.patch_level)
        feat = skips[self.patch_level]
        return F.avg_pool2d(feat, cells) if cells > 1 else feat

    def patch_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) encoder patch features of the unmasked image (MPS on features)."""
        self._check(x)
        self.grid(x)
        return self.patch_features(self.encode(self.standardize(x))).flatten(2).transpose(1, 2)

    def mask_input(self, x: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """The masked image x_m: the masked patches set to 0 (the dataset mean once standardised)."""
        grid = self.grid(x)
        if patch_mask.shape != (x.shape[0], grid[0] * grid[1]) or patch_mask.dtype != torch.bool:
            raise ValueError(f"patch_mask should be a bool (B, N) = ({x.shape[0]}, {grid[0] * grid[1]}) tensor, "
                             f"got {patch_mask.dtype} {tuple(patch_mask.shape)}")
        pixels = patch_mask_to_pixels(patch_mask, self.cfg.patch_size, grid)
        return x.masked_fill(pixels, 0)

    def forward(self, x: torch.Tensor, patch_mask: torch.Tensor | None = None) -> SegmentationOutput:
        """Segmentation logits plus extras ``reconstruction`` (B, C, H, W) and ``patch_logits`` (B, N),
        computed on the masked image when ``patch_mask`` (B, N) bool is given."""
        self._check(x)
        grid = self.grid(x)
        x = self.standardize(x)  # the reconstruction is of the standardised image
        if patch_mask is not None:
            x = self.mask_input(x, patch_mask)
        skips = self.encode(x)
        patch_logits = self.fg_head(self.patch_features(skips)).reshape(x.shape[0], grid[0] * grid[1])
        y = skips.pop()
        for block in self.up:
            y = block(y, skips.pop())
        return SegmentationOutput(self.head(y), {"reconstruction": self.recon_head(y), "patch_logits": patch_logits})


def _amlp_unet(name: str, defaults: dict, kwargs: dict) -> AMLPUNet:
    return AMLPUNet(build_config(AMLPUNetConfig, defaults, kwargs, name))


@register_model
def amlp_unet(**kwargs) -> AMLPUNet:
    """AMLP pre-training U-Net at paper size (``unet`` + heads; 16-px patches: 256 at 256 px)."""
    return _amlp_unet("amlp_unet", {}, kwargs)


@register_model
def amlp_unet_tiny(**kwargs) -> AMLPUNet:
    """AMLP pre-training ``unet_tiny`` (+ heads; 8-px patches: 256 at 128 px)."""
    return _amlp_unet("amlp_unet_tiny", {"widths": (16, 32, 64, 128, 256), "patch_size": 8}, kwargs)


__all__ = ["AMLPUNet", "AMLPUNetConfig", "amlp_unet", "amlp_unet_tiny"]
