"""SegMAE (Huang et al., ICIC 2025): TransUNet's hybrid encoder with MAE masking and two decoders.

The encoder (CNN + ViT) sees a random subset of the patch tokens (Eq. 1-2); an MAE decoder
(Eq. 3-4) reconstructs the pixels of the masked patches and the Cascaded Upsampler segments.
Inference never masks. ``segmae_r50_vit_b16`` is TransUNet R50-ViT-B/16 plus the MAE-B decoder
(512 wide, 8 blocks, 16 heads): ~131.3M parameters.

Choices the paper leaves open are config fields (docs/models.md):

- ``mask_mode``: ``"token"`` drops tokens after the CNN, which still sees the whole image;
  ``"pixel"`` also blanks the masked 16x16 patches of the image before the CNN, so neither the
  CNN nor its skips see them.
- ``mask_ratio``: "a high masking ratio"; 0.75 is MAE's (our choice).
- When a masked forward also segments, the CUP gets the token grid with zeros at the masked
  positions (ours; the SegMAE trainer segments unmasked images by default, see
  :mod:`lesionkit.engine.trainers.segmae`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lesionkit.layers.mae_decoder import MAEDecoder
from lesionkit.layers.patch_masking import random_patch_mask, unpatchify
from lesionkit.models.output import SegmentationOutput
from lesionkit.models.registry import build_config, register_model
from lesionkit.models.transunet import TINY_DEFAULTS, TransUNet, TransUNetConfig

MASK_MODES = ("token", "pixel")


@dataclass
class SegMAEConfig(TransUNetConfig):
    mae_decoder: bool = True  # False: the single-branch baseline of Table 4 row 1 (= TransUNet)
    mask_ratio: float = 0.75  # fraction of patches masked in training (our choice: MAE's)
    mask_mode: str = "token"  # "token" | "pixel", see the module docstring
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode should be one of {list(MASK_MODES)}, got {self.mask_mode!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio should be in [0, 1), got {self.mask_ratio}")


@dataclass
class SegMAEOutput(SegmentationOutput):
    """``logits`` (B, K, H, W) - ``None`` for a reconstruction-only pass - plus the MAE branch.

    ``reconstruction`` (B, C, H, W) holds the decoder's pixels for every patch (only the masked
    ones are trained on); ``mask`` (B, N) is True at masked patches, row-major over the
    (H / patch_size) x (W / patch_size) grid - the patch mask of ``patchwise_softmax_loss``.
    Both are ``None`` when nothing was masked. ``extras`` repeats them by name.
    """

    reconstruction: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    patch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("reconstruction", "mask"):
            value = getattr(self, name)
            if value is not None:
                self.extras.setdefault(name, value)


class SegMAE(TransUNet):
    def __init__(self, cfg: SegMAEConfig, model_name: str = "segmae") -> None:
        super().__init__(cfg, model_name)
        self.patch_size = cfg.reduction  # one token per reduction x reduction pixel patch
        self.mae = None
        if cfg.mae_decoder:
            self.mae = MAEDecoder(cfg.embed_dim, self.patch_size, cfg.in_chans, cfg.decoder_embed_dim,
                                  cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor, mask_ratio: float | None = None, segment: bool = True) -> SegMAEOutput:
        """Segment and, when patches are masked, reconstruct them.

        ``mask_ratio=None`` means ``cfg.mask_ratio`` in training mode and 0 (no masking) in eval
        mode or without the MAE decoder. ``segment=False`` skips the CUP (reconstruction steps).
        """
        if mask_ratio is None:
            mask_ratio = self.cfg.mask_ratio if (self.training and self.mae is not None) else 0.0
        if mask_ratio > 0 and self.mae is None:
            raise ValueError(f"mask_ratio={mask_ratio} needs the MAE decoder; this model has mae_decoder=False")
        if not segment and mask_ratio <= 0:
            raise ValueError("segment=False with no masking computes nothing; give mask_ratio > 0")
        self.encoder.check_input(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        n = grid[0] * grid[1]
        pmask = random_patch_mask(x.shape[0], n, mask_ratio, device=x.device) if mask_ratio > 0 else None
        enc = self.encoder(x, pmask, self.cfg.mask_mode)
        logits = reconstruction = None
        if segment:
            tokens = enc.tokens
            if pmask is not None:  # visible tokens back on the grid, zeros where masked
                full = tokens.new_zeros(x.shape[0], n, tokens.shape[-1])
                tokens = full.scatter(1, pmask.ids_keep[..., None].expand(-1, -1, tokens.shape[-1]), tokens)
            logits = self.segment(tokens, grid, enc.skips)
        if pmask is not None:
            patches = self.mae(enc.tokens, pmask.ids_restore, grid)
            reconstruction = unpatchify(patches, self.patch_size, grid, self.cfg.in_chans)
        return SegMAEOutput(logits=logits, reconstruction=reconstruction,
                            mask=None if pmask is None else pmask.mask, patch_size=self.patch_size)


def _segmae(name: str, defaults: dict, kwargs: dict) -> SegMAE:
    return SegMAE(build_config(SegMAEConfig, defaults, kwargs, name), name)


# Registry smoke test: the same widths at one ViT / one MAE block and one CNN block per stage.
@register_model(smoke_test={"kwargs": {"depth": 1, "cnn_layers": (1, 1, 1), "decoder_depth": 1}})
def segmae_r50_vit_b16(**kwargs) -> SegMAE:
    """SegMAE: TransUNet R50-ViT-B/16 + MAE-B decoder (~131.3M parameters)."""
    return _segmae("segmae_r50_vit_b16", {}, kwargs)


@register_model
def segmae_tiny(**kwargs) -> SegMAE:
    """``transunet_tiny`` + a 128-wide, 2-block MAE decoder, for 128-px input on a CPU."""
    return _segmae("segmae_tiny", {**TINY_DEFAULTS, "decoder_embed_dim": 128, "decoder_depth": 2,
                                   "decoder_num_heads": 4}, kwargs)


__all__ = ["MASK_MODES", "SegMAE", "SegMAEConfig", "SegMAEOutput", "segmae_r50_vit_b16", "segmae_tiny"]
