"""Segmentation losses over logits: Dice, BCE + Dice, focal, Dice + focal, the patch-wise softmax
loss (SegMAE Eq. 5-8) and a weighted sum of any of them.

All take `logits` and `target` of the same shape (B, C, H, W) (or (B, H, W)), target in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.reduction import check_reduction, reduce_loss

AGGREGATIONS = ("sample", "batch")


def _check(logits: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"{name}: logits and target should have the same shape, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if logits.dim() < 2:
        raise ValueError(f"{name}: logits should be (B, ...) with B images, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name}: logits should be floating point, got {logits.dtype}")


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    # Sums over many pixels lose too much in half precision; float64 stays float64.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
              aggregation: str = "sample", reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss 1 - (2 sum(p t) + s) / (sum p + sum t + s), p = sigmoid(logits).

    aggregation "sample" scores each image on its own (then `reduction` over the batch);
    "batch" pools all pixels of the batch into one score (a scalar, `reduction` ignored).
    """
    _check(logits, target, "dice_loss")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation should be one of {AGGREGATIONS}, got {aggregation!r}")
    check_reduction(reduction)
    if smooth < 0:
        raise ValueError(f"smooth should be >= 0, got {smooth!r}")
    p = torch.sigmoid(_compute_dtype(logits)).flatten(1)
    t = target.to(p.dtype).flatten(1)
    if aggregation == "batch":
        p, t = p.reshape(1, -1), t.reshape(1, -1)
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    loss = 1 - (2 * inter + smooth) / (denom + smooth).clamp_min(1e-12)
    return loss[0] if aggregation == "batch" else reduce_loss(loss, reduction)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float | None = 0.25,
               gamma: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017, Eq. 5), mean over pixels per image, then `reduction`.

    alpha weights the positives (1 - alpha the negatives); None disables the weighting.
    """
    _check(logits, target, "focal_loss")
    check_reduction(reduction)
    if gamma < 0:
        raise ValueError(f"gamma should be >= 0, got {gamma!r}")
    x = _compute_dtype(logits)
    t = target.to(x.dtype)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return reduce_loss(loss.flatten(1).mean(1), reduction)


class DiceLoss(nn.Module):
    def __init__(self, smooth: float = 1.0, aggregation: str = "sample") -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation should be one of {AGGREGATIONS}, got {aggregation!r}")
        self.smooth, self.aggregation = smooth, aggregation

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_loss(logits, target, self.smooth, self.aggregation)


class FocalLoss(nn.Module):
    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, target, self.alpha, self.gamma)


class PatchwiseSoftmaxLoss(nn.Module):
    """The patch-wise softmax loss (SegMAE Eq. 5-8) as a module holding its configuration.

    ``from_logits`` (the default, for segmentation logits) applies a sigmoid first; with
    ``from_logits=False`` the inputs are compared as they are (probabilities, images). The math
    runs in :func:`lesionkit.kernels.patchwise_softmax_loss` on the backend selected there;
    ``mask``, ``detach_weights`` and ``reduction`` mean what they mean there.
    """

    def __init__(self, patch_size: int = 16, beta: float = 1.0, from_logits: bool = True,
                 detach_weights: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        if patch_size <= 0:
            raise ValueError(f"patch_size should be positive, got {patch_size!r}")
        if beta <= 0:
            raise ValueError(f"beta should be > 0, got {beta!r}")
        check_reduction(reduction)
        self.patch_size, self.beta = int(patch_size), float(beta)
        self.from_logits, self.detach_weights, self.reduction = bool(from_logits), bool(detach_weights), reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        # Imported here: the kernels package is optional at import time of lesionkit.losses.
        from lesionkit.kernels import patchwise_softmax_loss

        _check(logits, target, "PatchwiseSoftmaxLoss")
        pred = torch.sigmoid(logits) if self.from_logits else logits
        if pred.dim() == 3:
            pred, target = pred[:, None], target[:, None]
        return patchwise_softmax_loss(pred, target.to(pred.dtype), self.patch_size, self.beta,
                                      mask=mask, detach_weights=self.detach_weights, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, beta={self.beta}, from_logits={self.from_logits}, "
                f"detach_weights={self.detach_weights}, reduction={self.reduction!r}")


class SegmentationLoss(nn.Module):
    """Weighted sum of BCE, Dice, focal and patch-wise softmax terms; zero weights are skipped.

    BCE + Dice is ``SegmentationLoss(bce=1, dice=1)``; Dice + focal is
    ``SegmentationLoss(bce=0, dice=1, focal=1)``; SegMAE's fine-tuning loss adds ``patchwise``.
    """

    def __init__(self, bce: float = 1.0, dice: float = 1.0, focal: float = 0.0,
                 patchwise: float = 0.0, smooth: float = 1.0, aggregation: str = "sample",
                 focal_alpha: float | None = 0.25, focal_gamma: float = 2.0,
                 patch_size: int = 16, beta: float = 1.0, pos_weight: float | None = None) -> None:
        super().__init__()
        weights = {"bce": bce, "dice": dice, "focal": focal, "patchwise": patchwise}
        for k, v in weights.items():
            if v < 0:
                raise ValueError(f"{k} weight should be >= 0, got {v!r}")
        if not any(weights.values()):
            raise ValueError(f"at least one loss weight should be > 0, got {weights}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation should be one of {AGGREGATIONS}, got {aggregation!r}")
        self.weights = weights
        self.smooth, self.aggregation = smooth, aggregation
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.pos_weight = pos_weight
        self.patchwise = PatchwiseSoftmaxLoss(patch_size, beta) if patchwise else None

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each weighted-in term, unweighted (for logging)."""
        _check(logits, target, "SegmentationLoss")
        out = {}
        if self.weights["bce"]:
            pw = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
            out["bce"] = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), pos_weight=pw)
        if self.weights["dice"]:
            out["dice"] = dice_loss(logits, target, self.smooth, self.aggregation)
        if self.weights["focal"]:
            out["focal"] = focal_loss(logits, target, self.focal_alpha, self.focal_gamma)
        if self.patchwise is not None:
            out["patchwise"] = self.patchwise(logits, target)
        return out

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[k] * v for k, v in self.terms(logits, target).items())


def BCEDiceLoss(bce_weight: float = 1.0, dice_weight: float = 1.0, **kwargs) -> SegmentationLoss:
    """BCE + Dice with weights (a SegmentationLoss)."""
    return SegmentationLoss(bce=bce_weight, dice=dice_weight, **kwargs)


def DiceFocalLoss(dice_weight: float = 1.0, focal_weight: float = 1.0, **kwargs) -> SegmentationLoss:
    """Dice + focal with weights (a SegmentationLoss)."""
    return SegmentationLoss(bce=0.0, dice=dice_weight, focal=focal_weight, **kwargs)
