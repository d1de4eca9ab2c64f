"""MAE reconstruction loss over masked patches (He et al. 2022; SegMAE Eq. 12 when weighted)."""

from __future__ import annotations

import torch
from torch import nn

from lesionkit.layers.patch_masking import patchify, unpatchify


class MAEReconstructionLoss(nn.Module):
    """Squared error over the masked patches only.

    forward(pred, target, mask): pred and target (B, C, H, W) images, mask (B, N) bool with
    True where a patch was masked out (N = H/P * W/P, row-major). With ``norm_pix`` the target
    of each patch is standardised over its pixels and channels (MAE's per-patch normalisation).
    With ``beta`` the patches are weighted by the patch-wise softmax (SegMAE Eq. 12) through
    ``lesionkit.kernels.patchwise_softmax_loss``; without it every masked patch counts equally
    (the plain MAE loss: mean over masked patches of the per-patch MSE).
    """

    def __init__(self, patch_size: int = 16, norm_pix: bool = False, beta: float | None = None,
                 eps: float = 1e-6) -> None:
        super().__init__()
        if patch_size <= 0:
            raise ValueError(f"patch_size should be positive, got {patch_size!r}")
        if beta is not None and beta <= 0:
            raise ValueError(f"beta should be > 0 or None, got {beta!r}")
        self.patch_size, self.norm_pix, self.beta, self.eps = int(patch_size), norm_pix, beta, eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.dim() != 4:
            raise ValueError(f"pred and target should be (B, C, H, W) of one shape, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        b, _, h, w = pred.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size ({h}, {w}) should be divisible by patch_size {p}")
        n = (h // p) * (w // p)
        if mask.shape != (b, n):
            raise ValueError(f"mask should be (B, N) = ({b}, {n}), got {tuple(mask.shape)}")
        mask = mask.to(device=pred.device, dtype=torch.bool)
        if self.norm_pix:
            t = patchify(target, p)
            mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
            target = unpatchify((t - mean) / (var + self.eps).sqrt(), p, (h // p, w // p), target.shape[1])
        if self.beta is not None:
            from lesionkit.kernels import patchwise_softmax_loss

            return patchwise_softmax_loss(pred, target.to(pred.dtype), p, self.beta, mask=mask)
        per_patch = (patchify(pred, p) - patchify(target, p)).pow(2).mean(-1)
        m = mask.to(per_patch.dtype)
        return (per_patch * m).sum() / m.sum().clamp_min(1)
