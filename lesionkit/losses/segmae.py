"""SegMAE's two objectives (Huang et al., ICIC 2025): the segmentation loss of Eq. 11 and the
masked reconstruction loss of Eq. 12, each optionally weighted patch-wise (Eq. 5-8).

Eq. 8 divides the softmax-weighted sum by N although the weights already sum to 1, which makes
the term N times smaller than the MSE it generalises (1/196 at 224 px). ``scale="weighted_mean"``
(our default, see docs/segmae.md) multiplies by N, giving ``sum_i w_i L'_i``, which equals the
MSE as beta -> inf; ``scale="eq8"`` keeps the paper's 1/N.
"""

from __future__ import annotations

import torch
from torch import nn

from lesionkit.losses.reconstruction import MAEReconstructionLoss
from lesionkit.losses.segmentation import SegmentationLoss

PATCHWISE_SCALES = ("weighted_mean", "eq8")


def _check_scale(scale: str) -> None:
    if scale not in PATCHWISE_SCALES:
        raise ValueError(f"scale should be one of {list(PATCHWISE_SCALES)}, got {scale!r}")


class SegMAESegmentationLoss(nn.Module):
    """Eq. 11: ``bce_weight`` BCE + ``dice_weight`` Dice + ``patch_weight`` patch-wise softmax loss
    on probabilities (Eq. 5-8) with ``patch_size`` x ``patch_size`` patches and temperature ``beta``.

    The Dice term is the standard ``1 - 2|XY| / (|X| + |Y|)`` (smooth 1, per image); Eq. 10 as
    printed carries a stray factor 2 that would make a perfect prediction score -1 (docs/segmae.md).
    """

    def __init__(self, bce_weight: float = 1.2, dice_weight: float = 0.4, patch_weight: float = 0.8,
                 patch_size: int = 16, beta: float = 0.25, scale: str = "weighted_mean") -> None:
        super().__init__()
        _check_scale(scale)
        self.terms_loss = SegmentationLoss(bce=bce_weight, dice=dice_weight, patchwise=patch_weight,
                                           patch_size=patch_size, beta=beta)
        self.scale_patchwise = scale == "weighted_mean"
        self.patch_size = patch_size

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss": weighted sum, "bce": .., "dice": .., "patchwise": ..}`` (terms unweighted)."""
        h, w = logits.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} should divide the image size, got {h}x{w}")
        terms = self.terms_loss.terms(logits, target)
        if "patchwise" in terms and self.scale_patchwise:
            terms["patchwise"] = terms["patchwise"] * ((h // self.patch_size) * (w // self.patch_size))
        total = sum(self.terms_loss.weights[k] * v for k, v in terms.items())
        return {"loss": total, **terms}


class SegMAEReconstructionLoss(nn.Module):
    """The MAE loss over masked patches (Eq. 12): softmax-weighted per patch with temperature
    ``beta`` (Eq. 7), or the plain masked MSE of MAE when ``beta`` is None."""

    def __init__(self, patch_size: int, beta: float | None = 0.02, norm_pix: bool = False,
                 scale: str = "weighted_mean") -> None:
        super().__init__()
        _check_scale(scale)
        self.loss = MAEReconstructionLoss(patch_size=patch_size, norm_pix=norm_pix, beta=beta)
        self.scale = beta is not None and scale == "weighted_mean"

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = self.loss(reconstruction.float(), target.float(), mask)
        if self.scale:
            # Every image has the same number of masked patches (random_patch_mask), N in Eq. 8.
            loss = loss * mask[0].sum().to(loss.dtype)
        return loss


__all__ = ["PATCHWISE_SCALES", "SegMAEReconstructionLoss", "SegMAESegmentationLoss"]
