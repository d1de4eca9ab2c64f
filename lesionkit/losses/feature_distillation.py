"""CM-SSM's feature distillation losses (Sec. 3.4, Eq. 8-10), in the form of SelfReg-UNet's.

Feature maps are (B, C, H, W). "||.||^2" of the paper is read as the mean squared error over
the aligned elements, averaged over the blocks (the 1/|M-1| and 1/|M| of Eq. 8-9); the batch
mean stands for the 1/|J| over images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def _check_maps(name: str, maps: Sequence[torch.Tensor]) -> None:
    if len(maps) == 0:
        raise ValueError(f"{name} should hold at least one feature map")
    for i, f in enumerate(maps):
        if f.dim() != 4:
            raise ValueError(f"{name}[{i}] should be a (B, C, H, W) feature map, got shape {tuple(f.shape)}")


def align_pair(student: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the larger map to the smaller's size; pair min(C_s, C_t) channels, a random subset
    in random order of the side with more channels against the other side's channels in order
    (random channel selection, RCS)."""
    hs, ws = student.shape[-2:]
    ht, wt = target.shape[-2:]
    if hs * ws > ht * wt:
        student = F.adaptive_avg_pool2d(student, (ht, wt))
    elif hs * ws < ht * wt:
        target = F.adaptive_avg_pool2d(target, (hs, ws))
    cs, ct = student.shape[1], target.shape[1]
    if cs > ct:
        idx = torch.randperm(cs, generator=generator)[:ct].to(student.device)
        student = student.index_select(1, idx)
    elif ct > cs:
        idx = torch.randperm(ct, generator=generator)[:cs].to(target.device)
        target = target.index_select(1, idx)
    return student, target


def cross_feature_distillation(features: Sequence[torch.Tensor], final: torch.Tensor,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """L_CFD (Eq. 8): each block's features against the final decoder block's, which is the
    teacher and carries no gradient; mean over the M - 1 blocks."""
    _check_maps("features", features)
    _check_maps("final", [final])
    target = final.detach()
    terms = []
    for f in features:
        s, t = align_pair(f, target, generator)
        terms.append(F.mse_loss(s.float(), t.float()))
    return torch.stack(terms).mean()


def internal_feature_distillation(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_IFD (Eq. 9): per block, the channels ranked by their mean activation (over batch and
    space, descending); the upper half against the lower half, no target detached (ours; the
    paper's Eq. 9 penalises the plain difference). An odd channel count leaves the last out."""
    _check_maps("features", features)
    terms = []
    for f in features:
        c = f.shape[1]
        if c < 2:
            raise ValueError(f"internal_feature_distillation needs >= 2 channels per map, got {tuple(f.shape)}")
        order = torch.argsort(f.detach().float().mean(dim=(0, 2, 3)), descending=True)
        f = f.float().index_select(1, order)
        half = c // 2
        terms.append(F.mse_loss(f[:, :half], f[:, half:2 * half]))
    return torch.stack(terms).mean()


__all__ = ["align_pair", "cross_feature_distillation", "internal_feature_distillation"]
