"""CM-SSM's feature distillation losses (Sec. 3.4, Eq. 8-10), in the form of SelfReg-UNet's.

Feature maps are (B, C, H, W). "||.||^2" of the paper is read as the mean squared error over
the aligned elements, averaged over the blocks (the 1/|M-1| and 1/|M| of Eq. 8-9); the batch
mean stands for the 1/|J| over images. :class:`FeatureDistillation` picks the maps from a
network's named block outputs (``VMUNet.forward_intermediates`` / ``block_names``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# Which maps the losses read: "blocks" - every VSS block's output, as Eq. 8-9 list them
# (E1(1), E1(2), ..., D2(2)); "stages" - the last block of each stage (lesionkit 0.1.0).
FD_MAPS = ("blocks", "stages")
# How IFD splits a map's channels: "halves" - the first half against the second, as the text of
# Eq. 9 says; "ranked" - channels sorted by mean activation first (SelfReg-UNet's code, and
# lesionkit 0.1.0).
IFD_SPLITS = ("halves", "ranked")


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


def internal_feature_distillation(features: Sequence[torch.Tensor], split: str = "halves") -> torch.Tensor:
    """L_IFD (Eq. 9): per map, the MSE between its upper and its lower half of the channels,
    nothing detached (the paper penalises the plain difference); mean over the maps. With
    ``split="ranked"`` the channels are first sorted by their mean activation over batch and
    space, descending. An odd channel count leaves the last channel out."""
    _check_maps("features", features)
    if split not in IFD_SPLITS:
        raise ValueError(f"split should be one of {list(IFD_SPLITS)}, got {split!r}")
    terms = []
    for f in features:
        c = f.shape[1]
        if c < 2:
            raise ValueError(f"internal_feature_distillation needs >= 2 channels per map, got {tuple(f.shape)}")
        f = f.float()
        if split == "ranked":
            f = f.index_select(1, torch.argsort(f.detach().mean(dim=(0, 2, 3)), descending=True))
        half = c // 2
        terms.append(F.mse_loss(f[:, :half], f[:, half:2 * half]))
    return torch.stack(terms).mean()


def stage_of(block_name: str) -> str:
    """'E2(1)' -> 'E2': the stage a block of ``VMUNet.block_names`` belongs to."""
    return block_name.split("(", 1)[0]


class FeatureDistillation(nn.Module):
    """L_fd = lambda1 L_CFD + lambda2 L_IFD (Eq. 10) over a network's named block outputs.

    The teacher F_final is the output of the last decoder block, D1; the maps both losses read
    are those of every other block, E1(1) .. D2(d) (Eq. 8-9), or only each stage's last block
    with ``maps="stages"``. Returns the weighted terms ``{"cfd_loss", "ifd_loss"}`` of the losses
    that are on (weight > 0).
    """

    def __init__(self, cfd_weight: float = 0.015, ifd_weight: float = 0.015, maps: str = "blocks",
                 ifd_split: str = "halves") -> None:
        super().__init__()
        if cfd_weight < 0 or ifd_weight < 0:
            raise ValueError(f"cfd_weight and ifd_weight should be >= 0, got {cfd_weight}, {ifd_weight}")
        if maps not in FD_MAPS:
            raise ValueError(f"maps should be one of {list(FD_MAPS)}, got {maps!r}")
        if ifd_split not in IFD_SPLITS:
            raise ValueError(f"ifd_split should be one of {list(IFD_SPLITS)}, got {ifd_split!r}")
        self.cfd_weight, self.ifd_weight, self.maps, self.ifd_split = cfd_weight, ifd_weight, maps, ifd_split

    def select(self, features: Sequence[torch.Tensor], names: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(the maps of Eq. 8-9, F_final) from the block outputs and their names."""
        if len(features) != len(names) or not names:
            raise ValueError(f"got {len(features)} feature maps for {len(names)} block names")
        stages = [stage_of(n) for n in names]
        final = stages[-1]
        if final != "D1":
            raise ValueError(f"the last block should belong to the last decoder stage D1, got {names[-1]!r}")
        keep = [i for i, s in enumerate(stages) if s != final]
        if self.maps == "stages":  # the last block of each stage
            keep = [i for i in keep if stages[i + 1] != stages[i]]
        return [features[i] for i in keep], features[-1]

    def forward(self, features: Sequence[torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
        maps, final = self.select(features, names)
        out = {}
        if self.cfd_weight > 0:
            out["cfd_loss"] = self.cfd_weight * cross_feature_distillation(maps, final)
        if self.ifd_weight > 0:
            out["ifd_loss"] = self.ifd_weight * internal_feature_distillation(maps, self.ifd_split)
        return out

    def extra_repr(self) -> str:
        return f"cfd_weight={self.cfd_weight}, ifd_weight={self.ifd_weight}, maps={self.maps!r}, ifd_split={self.ifd_split!r}"


__all__ = ["FD_MAPS", "IFD_SPLITS", "FeatureDistillation", "align_pair", "cross_feature_distillation",
           "internal_feature_distillation", "stage_of"]
