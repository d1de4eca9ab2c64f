"""Segmentation and reconstruction losses; every segmentation loss takes logits."""

from __future__ import annotations

from lesionkit.losses.reconstruction import MAEReconstructionLoss
from lesionkit.losses.segmae import SegMAEReconstructionLoss, SegMAESegmentationLoss
from lesionkit.losses.segmentation import (
    BCEDiceLoss,
    DiceFocalLoss,
    DiceLoss,
    FocalLoss,
    PatchwiseSoftmaxLoss,
    SegmentationLoss,
    dice_loss,
    focal_loss,
)

_FACTORIES = {
    "dice": lambda **kw: SegmentationLoss(bce=0.0, dice=1.0, **kw),
    "bce": lambda **kw: SegmentationLoss(bce=1.0, dice=0.0, **kw),
    "bce_dice": BCEDiceLoss,
    "focal": lambda **kw: SegmentationLoss(bce=0.0, dice=0.0, focal=1.0, **kw),
    "dice_focal": DiceFocalLoss,
    "patchwise": lambda **kw: SegmentationLoss(bce=0.0, dice=0.0, patchwise=1.0, **kw),
    "segmentation": SegmentationLoss,
}


def list_losses() -> list[str]:
    return sorted(_FACTORIES)


def create_loss(name: str, **kwargs):
    """A segmentation loss by name (see ``list_losses()``), keyword arguments as SegmentationLoss."""
    if name not in _FACTORIES:
        raise ValueError(f"loss name should be one of {list_losses()}, got {name!r}")
    return _FACTORIES[name](**kwargs)


__all__ = [
    "BCEDiceLoss",
    "DiceFocalLoss",
    "DiceLoss",
    "FocalLoss",
    "MAEReconstructionLoss",
    "PatchwiseSoftmaxLoss",
    "SegMAEReconstructionLoss",
    "SegMAESegmentationLoss",
    "SegmentationLoss",
    "create_loss",
    "dice_loss",
    "focal_loss",
    "list_losses",
]
