"""AMLP's attention reconstruction loss (ARL, Sec. 3.2) and category consistency loss (CCL,
Sec. 3.3), in a trainable reading.

As printed, neither has a gradient: Eq. 6, L_rrl^i = N L_pred^i / sum_j L_pred^j, sums to N
over the patches (a constant), and Eq. 7 compares the hard labels label_new and label_ori. Our
reading (docs/amlp.md):

- ARL: every masked patch's reconstruction loss weighted by its relative difficulty
  L_rrl^i (Eq. 6 over the masked patches, detached, so the weights average 1):
  L_arl = (1 / n_m) sum_i L_rrl^i L_pred^i.
- CCL: a per-patch foreground head gives a logit per patch; label_new comes from the paper's
  four rules (k-means label_ori against L_rrl >= its mean of 1; a random label, from a seeded
  generator, where the two disagree), and L_ccl is the binary cross-entropy of the head's
  probability against label_new over the patches where it is computed. Sec. 3.3: "When
  label_new != label_ori, we calculate the category consistency loss" - the masked patches whose
  label changed (:func:`ccl_patches`, ``"changed"``); lesionkit 0.1.0 used every masked patch
  (``"masked"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_patch_tensors(patch_loss: torch.Tensor, mask: torch.Tensor) -> None:
    if patch_loss.dim() != 2:
        raise ValueError(f"patch_loss should be a (B, N) tensor, got shape {tuple(patch_loss.shape)}")
    if mask.shape != patch_loss.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask should be a bool (B, N) = {tuple(patch_loss.shape)} tensor, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if patch_loss.shape[0] and not bool(mask.any(dim=1).all()):
        raise ValueError("mask should mask at least one patch per image")


def relative_reconstruction_loss(patch_loss: torch.Tensor, mask: torch.Tensor,
                                 eps: float = 1e-12) -> torch.Tensor:
    """Eq. 6 over the masked patches: L_rrl^i = n_m L^i / sum_masked L (0 where unmasked).

    Detached: a weight, never a path for the gradient. Masked patches average exactly 1.
    """
    _check_patch_tensors(patch_loss, mask)
    loss = patch_loss.detach().masked_fill(~mask, 0)
    n_m = mask.sum(dim=1, keepdim=True).to(loss.dtype)
    total = loss.sum(dim=1, keepdim=True)
    # All masked patches reconstructed perfectly: equal difficulty, weight 1 each.
    rrl = torch.where(total > eps, n_m * loss / total.clamp_min(eps), torch.ones_like(loss))
    return rrl.masked_fill(~mask, 0)


def attention_reconstruction_loss(patch_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ARL: mean over images of (1 / n_m) sum_masked L_rrl^i.detach() * L_pred^i."""
    weights = relative_reconstruction_loss(patch_loss, mask)
    n_m = mask.sum(dim=1).to(patch_loss.dtype)
    return ((weights * patch_loss.masked_fill(~mask, 0)).sum(dim=1) / n_m).mean()


def update_patch_labels(label_ori: torch.Tensor, rrl: torch.Tensor, mask: torch.Tensor,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """label_new (B, N) float from the four rules of Sec. 3.3 (on the masked patches).

    (1) label_ori = 1 and L_rrl >= 1 (its mean) -> 1; (2) label_ori = 0 and L_rrl < 1 -> 0;
    (3), (4) disagreement -> 0 or 1 with probability 1/2, drawn from `generator` (CPU).
    Unmasked patches keep label_ori. The paper writes > and < for the rules and >= for
    "relatively important" (Sec. 3.2); a patch exactly at the mean counts as hard here.
    """
    if label_ori.shape != rrl.shape or mask.shape != rrl.shape:
        raise ValueError(f"label_ori, rrl and mask should have one shape, got {tuple(label_ori.shape)}, "
                         f"{tuple(rrl.shape)}, {tuple(mask.shape)}")
    fg = label_ori.bool()
    hard = rrl >= 1
    coin = torch.rand(rrl.shape, generator=generator, device="cpu").to(rrl.device) < 0.5
    new = torch.where(fg == hard, fg, coin)
    return torch.where(mask, new, fg).to(rrl.dtype)


CCL_PATCHES = ("changed", "masked")


def ccl_patches(label_ori: torch.Tensor, label_new: torch.Tensor, mask: torch.Tensor,
                which: str = "changed") -> torch.Tensor:
    """(B, N) bool: where CCL is computed. ``changed``: the masked patches whose updated label
    differs from the k-means label (Sec. 3.3); ``masked``: every masked patch."""
    if which not in CCL_PATCHES:
        raise ValueError(f"which should be one of {list(CCL_PATCHES)}, got {which!r}")
    if which == "masked":
        return mask
    return mask & (label_new.bool() != label_ori.bool())


def category_consistency_loss(logits: torch.Tensor, label_new: torch.Tensor,
                              patches: torch.Tensor) -> torch.Tensor:
    """CCL: binary cross-entropy of the foreground head's logits (B, N) against label_new,
    averaged over the selected ``patches`` of the batch (:func:`ccl_patches`); 0 where none is
    selected. With the same number of patches per image (the masked ones) this equals the mean
    over each image's patches, then over the images."""
    if logits.shape != label_new.shape or patches.shape != logits.shape:
        raise ValueError(f"logits, label_new and patches should have one shape, got {tuple(logits.shape)}, "
                         f"{tuple(label_new.shape)}, {tuple(patches.shape)}")
    per_patch = F.binary_cross_entropy_with_logits(logits, label_new.to(logits.dtype), reduction="none")
    count = patches.sum().clamp_min(1).to(per_patch.dtype)
    return per_patch.masked_fill(~patches, 0).sum() / count
