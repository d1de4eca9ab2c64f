"""A plain ViT masked autoencoder (He et al. 2022) for GRCSF's residual maps (GRCSF Sec. 3.3.1).

GRCSF reconstructs each image with an MAE at mask ratios 0.5 and 0.75 and takes the pixel-wise
difference to the image (Eq. 3-5, :mod:`lesionkit.engine.trainers.residual_maps`). The MAE here is the
original recipe: a ViT encoder sees only the visible patches (so nothing of a masked patch
leaks into its reconstruction), the MAE decoder of SegMAE (:class:`~lesionkit.layers.mae_decoder.MAEDecoder`)
restores the pixels of every patch from them, and training minimises the MSE over the masked
patches (:class:`~lesionkit.losses.reconstruction.MAEReconstructionLoss`). Position embeddings
are the fixed 2-D sin-cos ones, computed for each input's grid, so any multiple of the patch
size works. The paper's MAE is a ViT-Large trained with an extra GAN loss on non-lesion slices;
``mae_vit_base`` (ViT-B/16 + MAE-B decoder) is our paper-scale recipe and ``mae_vit_tiny`` the
CPU one. No downloaded weights: both are trained on the training images (``trainer: mae``).

``forward(image, mask=None, mask_ratio=None)`` returns an :class:`MAEOutput`; these models are
not segmenters (their registry smoke test checks the reconstruction, ``task: reconstruction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lesionkit.layers.mae_decoder import MAEDecoder
from lesionkit.layers.patch_masking import PatchMask, random_patch_mask, unpatchify
from lesionkit.layers.pos_embed import sincos_pos_embed_2d
from lesionkit.models.registry import build_config, register_model


@dataclass
class MAEConfig:
    in_chans: int = 3
    img_size: int = 224  # the training size; other multiples of patch_size work too
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75  # default of a training forward; GRCSF's trainer draws from its list

    def __post_init__(self) -> None:
        for name in ("in_chans", "patch_size", "embed_dim", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} should be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError(f"embed_dim should be a multiple of num_heads and of 4, got {self.embed_dim} "
                             f"with num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size should be a multiple of patch_size, got {self.img_size} and {self.patch_size}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio should be in (0, 1), got {self.mask_ratio}")


@dataclass
class MAEOutput:
    """``reconstruction`` (B, C, H, W): the decoder's pixels for every patch (trained on the masked
    ones); ``mask`` (B, N) True at masked patches, row-major over the patch grid."""

    reconstruction: torch.Tensor
    mask: torch.Tensor
    patch_size: int


class MaskedAutoencoder(nn.Module):
    def __init__(self, cfg: MAEConfig) -> None:
        from timm.models.vision_transformer import Block  # imported on use: timm is slow to import

        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
                                      for _ in range(cfg.depth)))
        self.norm = norm(cfg.embed_dim)
        self.decoder = MAEDecoder(cfg.embed_dim, cfg.patch_size, cfg.in_chans, cfg.decoder_embed_dim,
                                  cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio)
        # MAE's initialisation: the patch embedding like a linear layer, xavier-uniform linears.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(cfg.embed_dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def grid_size(self, image: torch.Tensor) -> tuple[int, int]:
        cfg = self.cfg
        if image.ndim != 4 or image.shape[1] != cfg.in_chans:
            raise ValueError(f"image should be (B, {cfg.in_chans}, H, W), got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image height and width should be multiples of patch_size={self.patch_size}, got {h}x{w}")
        return h // self.patch_size, w // self.patch_size

    def forward(self, image: torch.Tensor, mask: PatchMask | None = None, mask_ratio: float | None = None) -> MAEOutput:
        """Encode the visible patches of ``mask`` (or of a fresh random mask at ``mask_ratio``,
        default ``cfg.mask_ratio``) and reconstruct every patch."""
        grid = self.grid_size(image)
        n = grid[0] * grid[1]
        if mask is None:
            mask = random_patch_mask(image.shape[0], n, self.cfg.mask_ratio if mask_ratio is None else mask_ratio,
                                     device=image.device)
        elif tuple(mask.mask.shape) != (image.shape[0], n):
            raise ValueError(f"mask should cover ({image.shape[0]}, {n}) patches, got {tuple(mask.mask.shape)}")
        patches = self._decode(self.embed(image), mask, grid)
        reconstruction = unpatchify(patches, self.patch_size, grid, self.cfg.in_chans)
        return MAEOutput(reconstruction=reconstruction, mask=mask.mask, patch_size=self.patch_size)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Every patch's token with its position embedding: (B, N, D), patches row-major."""
        grid = self.grid_size(image)
        tokens = self.patch_embed(image).flatten(2).transpose(1, 2)
        return tokens + sincos_pos_embed_2d(self.cfg.embed_dim, grid, device=tokens.device, dtype=tokens.dtype)

    def _decode(self, tokens: torch.Tensor, mask: PatchMask, grid: tuple[int, int],
                select: torch.Tensor | None = None, pixels: bool = True, repeats: int = 1) -> torch.Tensor:
        """The MAE on ``mask``'s rows; row r masks image r // ``repeats`` of ``tokens`` (B, N, D)."""
        if repeats == 1:
            visible = torch.gather(tokens, 1, mask.ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        else:  # each row's visible tokens straight from its image's: no per-masking copy of them all
            rows, keep = mask.ids_keep.shape
            image_of_row = torch.arange(rows, device=tokens.device) // repeats
            flat = (image_of_row[:, None] * tokens.shape[1] + mask.ids_keep).flatten()
            visible = tokens.reshape(-1, tokens.shape[-1]).index_select(0, flat).view(rows, keep, -1)
        encoded = self.norm(self.blocks(visible))
        return self.decoder(encoded, mask.ids_restore, grid, select, pixels)

    def predict_masked_patches(self, image: torch.Tensor, mask: PatchMask, repeats: int = 1) -> torch.Tensor:
        """The reconstructed pixels of the masked patches only, for ``repeats`` maskings per image.

        ``mask`` has B * repeats rows; rows k * repeats .. (k + 1) * repeats - 1 mask image k.
        Returns (S, P * P * C), one row per masked (mask row, patch) pair in row-major order (the
        order of ``mask.mask.nonzero()``), pixels laid out as :func:`unpatchify` reads them. The
        same values as ``forward(image.repeat_interleave(repeats, 0), mask)`` at those patches,
        computed with less: each image's patches are embedded once, and the decoder's last block
        (queries of the masked patches against every token), its norm and the pixel head run on
        the masked patches only."""
        return self.patch_pixels(self.masked_patch_features(image, mask, repeats))

    def masked_patch_features(self, image: torch.Tensor, mask: PatchMask, repeats: int = 1,
                              tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``predict_masked_patches`` without the pixel head: (S, decoder width), the decoder's
        normalised tokens at the masked patches, which :meth:`patch_pixels` maps to pixels. The
        head is linear, so the mean of several maskings' pixels of a patch is the pixels of the
        mean of their features (GRCSF's maps average five; ``residual_maps`` runs the head once
        per patch instead of once per masking that hid it). ``tokens``: ``embed(image)`` where
        the caller has it already (one embedding for several masks of the same images)."""
        grid = self.grid_size(image)
        n = grid[0] * grid[1]
        if repeats < 1:
            raise ValueError(f"repeats should be >= 1, got {repeats}")
        if tuple(mask.mask.shape) != (image.shape[0] * repeats, n):
            raise ValueError(f"mask should cover ({image.shape[0] * repeats}, {n}) patches (repeats={repeats}), "
                             f"got {tuple(mask.mask.shape)}")
        if tokens is None:
            tokens = self.embed(image)
        elif tuple(tokens.shape) != (image.shape[0], n, self.cfg.embed_dim):
            raise ValueError(f"tokens should be embed(image), ({image.shape[0]}, {n}, {self.cfg.embed_dim}), "
                             f"got {tuple(tokens.shape)}")
        return self._decode(tokens, mask, grid, select=mask.mask, pixels=False, repeats=repeats)

    def patch_pixels(self, features: torch.Tensor) -> torch.Tensor:
        """(..., decoder width) normalised decoder tokens -> (..., P * P * C) pixels (the pixel head)."""
        return self.decoder.pred(features)


def _mae(name: str, defaults: dict, kwargs: dict) -> MaskedAutoencoder:
    return MaskedAutoencoder(build_config(MAEConfig, defaults, kwargs, name))


_SMOKE = {"task": "reconstruction", "input_size": (3, 32, 32)}


@register_model(smoke_test={**_SMOKE, "kwargs": {"img_size": 32, "depth": 1, "decoder_depth": 1}})
def mae_vit_base(**kwargs) -> MaskedAutoencoder:
    """ViT-B/16 encoder + MAE-B decoder (512 wide, 8 blocks) at 224 px: GRCSF's MAE, paper scale."""
    return _mae("mae_vit_base", {}, kwargs)


@register_model(smoke_test={**_SMOKE, "kwargs": {"img_size": 32}})
def mae_vit_tiny(**kwargs) -> MaskedAutoencoder:
    """A 192-wide, 4-block ViT/16 encoder + 128-wide, 2-block decoder for 128 px on a CPU."""
    return _mae("mae_vit_tiny", {"img_size": 128, "embed_dim": 192, "depth": 4, "num_heads": 3,
                                 "decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4}, kwargs)


__all__ = ["MAEConfig", "MAEOutput", "MaskedAutoencoder", "mae_vit_base", "mae_vit_tiny"]
