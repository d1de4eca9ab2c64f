"""CM-SSM's recipe on the engine's :class:`Trainer` (``trainer: cmssm``): L_total = L_fd +
L_BceDice (Eq. 11), with L_fd = lambda1 L_CFD + lambda2 L_IFD (Eq. 10).

The segmentation part is the configured ``loss`` (the recipes: ``bce_dice`` with weights 0.3 /
0.7). The distillation part is :class:`~lesionkit.losses.feature_distillation.FeatureDistillation`
over the VSS block outputs that ``VMUNet.forward_intermediates`` returns, configured by the
``cmssm:`` block (:class:`CMSSMRecipe`; Table 5's rows are its ``cfd`` / ``ifd`` switches). The
switches of Table 4 (SE, CMN, CRA) are the model's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lesionkit.engine.config import TrainConfig
from lesionkit.engine.trainer import Trainer
from lesionkit.losses.feature_distillation import FD_MAPS, IFD_SPLITS, FeatureDistillation
from lesionkit.models import segmentation_logits

FD_TERMS = ("cfd_loss", "ifd_loss")


@dataclass
class CMSSMRecipe:
    cfd: bool = True  # cross-feature distillation, Eq. 8 (Table 5)
    ifd: bool = True  # internal feature distillation, Eq. 9 (Table 5)
    cfd_weight: float = 0.015  # lambda1, Eq. 10 (the paper's default)
    ifd_weight: float = 0.015  # lambda2, Eq. 10
    # "blocks": every VSS block's output, as Eq. 8-9 list them; "stages": each stage's last block.
    maps: str = "blocks"
    # "halves": IFD on the first vs the second half of the channels (Eq. 9's text);
    # "ranked": channels sorted by mean activation first (SelfReg-UNet's code).
    ifd_split: str = "halves"
    # Ours, off in the paper's recipes: the distillation terms start once this many epochs
    # (fractions allowed) or optimiser steps have passed, whichever is later. In the first steps
    # CFD's teacher, the last decoder block, is untrained, and pulling every block towards it
    # pulls towards noise; a budget of a few epochs feels that more than the paper's 300.
    fd_start_epochs: float = 0.0
    fd_start_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("cfd_weight", "ifd_weight", "fd_start_epochs"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"cmssm.{name} should be a finite number >= 0, got {value}")
        if self.fd_start_steps < 0:
            raise ValueError(f"cmssm.fd_start_steps should be >= 0, got {self.fd_start_steps}")
        if self.maps not in FD_MAPS:
            raise ValueError(f"cmssm.maps should be one of {list(FD_MAPS)}, got {self.maps!r}")
        if self.ifd_split not in IFD_SPLITS:
            raise ValueError(f"cmssm.ifd_split should be one of {list(IFD_SPLITS)}, got {self.ifd_split!r}")


@dataclass
class CMSSMTrainConfig(TrainConfig):
    trainer: str = "cmssm"
    cmssm: CMSSMRecipe = field(default_factory=CMSSMRecipe)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return super().from_dict(_move_model_distillation_keys(data))


def _move_model_distillation_keys(data: dict[str, Any]) -> dict[str, Any]:
    """lesionkit 0.1.0 set cfd / ifd / cfd_weight / ifd_weight as model kwargs: a config (or a
    checkpoint's header) that does so gets them moved into ``cmssm:``, where not set there."""
    from lesionkit.models.cmssm import MOVED_TO_RECIPE

    kwargs = (data.get("model") or {}).get("kwargs") or {}
    if not isinstance(kwargs, dict) or not any(k in kwargs for k in MOVED_TO_RECIPE):
        return data
    data = copy.deepcopy(data)
    kwargs = data["model"]["kwargs"]
    recipe = data["cmssm"] = data.get("cmssm") or {}
    for key in MOVED_TO_RECIPE:
        if key in kwargs:
            recipe.setdefault(key, kwargs.pop(key))
    return data


class CMSSMTrainer(Trainer):
    config_class = CMSSMTrainConfig

    def __init__(self, config: CMSSMTrainConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        recipe = config.cmssm
        self.distillation = FeatureDistillation(recipe.cfd_weight if recipe.cfd else 0.0,
                                                recipe.ifd_weight if recipe.ifd else 0.0,
                                                recipe.maps, recipe.ifd_split)
        weights = (self.distillation.cfd_weight, self.distillation.ifd_weight)
        self.fd_terms = tuple(k for k, w in zip(FD_TERMS, weights) if w > 0)
        if self.fd_terms and not hasattr(self.model, "block_names"):
            raise ValueError(f"cmssm.cfd / cmssm.ifd read the VSS block outputs of a VM-UNet-family model "
                             f"(vmunet*, cmssm_*), got model {config.model.name!r} ({type(self.model).__name__}); "
                             "set cmssm.cfd=false and cmssm.ifd=false to train it with the segmentation loss only")
        self.block_names = self.model.block_names() if self.fd_terms else []
        self.fd_start_step = max(recipe.fd_start_steps, math.ceil(recipe.fd_start_epochs * self.steps_per_epoch))

    def distilling(self) -> bool:
        return bool(self.fd_terms) and self.global_step >= self.fd_start_step

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        if not self.distilling():
            logits = segmentation_logits(self.forward(batch["image"]))
            seg = self.loss_fn(logits.float(), batch["mask"])
            zero = seg.detach() * 0
            return {"loss": seg, "seg_loss": seg.detach(), **{k: zero for k in self.fd_terms}}
        logits, features = self.forward(batch["image"], intermediates=True)
        seg = self.loss_fn(logits.float(), batch["mask"])
        fd = self.distillation(features, self.block_names)
        return {"loss": seg + sum(fd.values()), "seg_loss": seg.detach(), **{k: v.detach() for k, v in fd.items()}}
