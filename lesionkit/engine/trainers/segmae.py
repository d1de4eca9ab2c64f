"""SegMAE's two-stage recipe on the engine's :class:`Trainer` (``trainer: segmae``).

Stage ``mae`` (``segmae.mae_epochs``, paper: 50): reconstruction only - the encoder and the MAE
decoder learn to restore masked patches while the segmentation decoder is frozen (Sec. 3.3).
Stage ``hybrid`` (``epochs``, paper: 100): every iteration takes one segmentation step
(lambda1 BCE + lambda2 Dice + lambda3 patch-wise loss, Eq. 11) and then one reconstruction step
(the masked, patch-weighted MSE, Eq. 12) on the same batch, each with its own backward and
optimiser update. ``segmae.hybrid: false`` leaves the segmentation step alone (Table 4 row 1).

Every row of the paper's Table 4 is a setting of :class:`SegMAERecipe` (recipes segmae_ablation_*).
Values the paper does not give are marked "ours" below. The paper's augmentations (flips,
rotation within +-15 degrees, brightness / contrast) are the engine's ``data.transforms``, set in
the recipes. The losses are in :mod:`lesionkit.losses.segmae`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lesionkit.engine.config import TrainConfig
from lesionkit.engine.schedulers import build_scheduler, steps_per_batch
from lesionkit.engine.trainer import Stage, Trainer
from lesionkit.losses.segmae import PATCHWISE_SCALES, SegMAEReconstructionLoss, SegMAESegmentationLoss
from lesionkit.models import segmentation_logits



@dataclass
class SegMAERecipe:
    mae_epochs: int = 50  # stage 1, reconstruction only (paper: 50); 0 skips it
    hybrid: bool = True  # stage 2 alternates segmentation and reconstruction steps; false: segmentation only
    # Masking in segmentation steps. Ours: 0 - the CUP sees every token, as at inference.
    seg_mask_ratio: float = 0.0
    # Eq. 11 weights (paper: 1.2, 0.4, 0.8). patch_weight 0 turns the patch-wise loss L1 off.
    bce_weight: float = 1.2
    dice_weight: float = 0.4
    patch_weight: float = 0.8
    seg_patch_size: int = 16  # ours: the token patch
    # Ours: a patch whose error is larger by 2 * beta gets e^2 ~ 7x the weight. Segmentation
    # errors of probabilities lie in [0, 1]; pixel errors of [0, 1] images are ~10x smaller.
    seg_beta: float = 0.25
    recon_patchwise: bool = True  # L2: softmax patch weights (Eq. 12 + Eq. 7); false: plain masked MSE (MAE)
    recon_beta: float = 0.02
    recon_weight: float = 1.0  # scale of the reconstruction step's loss (ours)
    norm_pix_loss: bool = False  # MAE's per-patch normalised target (ours: off, the paper reconstructs pixels)
    # Eq. 8 divides the weighted sum by N although the softmax weights already sum to 1, which
    # makes the term N times smaller than the MSE it generalises (1/196 at 224 px). Ours:
    # "weighted_mean" (sum_i w_i L'_i, equal to the MSE when beta -> inf); "eq8" keeps the 1/N.
    patchwise_scale: str = "weighted_mean"

    def __post_init__(self) -> None:
        if self.mae_epochs < 0:
            raise ValueError(f"segmae.mae_epochs should be >= 0, got {self.mae_epochs}")
        if not 0.0 <= self.seg_mask_ratio < 1.0:
            raise ValueError(f"segmae.seg_mask_ratio should be in [0, 1), got {self.seg_mask_ratio}")
        for name in ("bce_weight", "dice_weight", "patch_weight", "recon_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"segmae.{name} should be >= 0, got {getattr(self, name)}")
        if self.bce_weight + self.dice_weight + self.patch_weight <= 0:
            raise ValueError("segmae: at least one of bce_weight, dice_weight, patch_weight should be > 0")
        for name in ("seg_beta", "recon_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"segmae.{name} should be > 0, got {getattr(self, name)}")
        if self.seg_patch_size < 1:
            raise ValueError(f"segmae.seg_patch_size should be >= 1, got {self.seg_patch_size}")
        if self.patchwise_scale not in PATCHWISE_SCALES:
            raise ValueError(f"segmae.patchwise_scale should be one of {list(PATCHWISE_SCALES)}, got {self.patchwise_scale!r}")


@dataclass
class SegMAETrainConfig(TrainConfig):
    trainer: str = "segmae"
    segmae: SegMAERecipe = field(default_factory=SegMAERecipe)


def build_segmentation_loss(recipe: SegMAERecipe) -> SegMAESegmentationLoss:
    """Eq. 11 with the recipe's weights."""
    return SegMAESegmentationLoss(bce_weight=recipe.bce_weight, dice_weight=recipe.dice_weight,
                                  patch_weight=recipe.patch_weight, patch_size=recipe.seg_patch_size,
                                  beta=recipe.seg_beta, scale=recipe.patchwise_scale)


def build_reconstruction_loss(recipe: SegMAERecipe, patch_size: int) -> SegMAEReconstructionLoss:
    """Eq. 12 (patch-weighted when ``recon_patchwise``) over ``patch_size`` patches."""
    return SegMAEReconstructionLoss(patch_size, beta=recipe.recon_beta if recipe.recon_patchwise else None,
                                    norm_pix=recipe.norm_pix_loss, scale=recipe.patchwise_scale)


class SegMAETrainer(Trainer):
    """Two-stage SegMAE training of a SegMAE model; a TransUNet trains with the same losses, one stage."""

    config_class = SegMAETrainConfig
    ddp_find_unused_parameters = True  # each step uses one decoder only
    optimizer_per_stage = True  # stage 'mae' trains without the CUP; 'hybrid' starts a fresh optimiser

    def __init__(self, config: SegMAETrainConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        from lesionkit.models.segmae import SegMAE
        from lesionkit.models.transunet import TransUNet

        if not isinstance(self.model, TransUNet):
            raise ValueError(f"trainer 'segmae' trains SegMAE and TransUNet models (segmae_r50_vit_b16, segmae_tiny, "
                             f"transunet_*), got model {config.model.name!r} ({type(self.model).__name__})")
        # The MAE branch, when the model has one (TransUNet and mae_decoder=False are the baseline).
        self.mae = self.model.mae if isinstance(self.model, SegMAE) else None
        recipe = config.segmae
        if (recipe.mae_epochs > 0 or recipe.hybrid or recipe.seg_mask_ratio > 0) and self.mae is None:
            raise ValueError(f"segmae.mae_epochs > 0, segmae.hybrid and segmae.seg_mask_ratio > 0 need the MAE decoder; "
                             f"model {config.model.name!r} has none (set segmae.mae_epochs=0, segmae.hybrid=false "
                             "for the single-branch baseline of Table 4 row 1)")
        self.recon_loss_fn = build_reconstruction_loss(recipe, self.model.patch_size) if self.mae is not None else None

    # ----------------------------------------------------------------------------- builders

    def build_loss(self) -> nn.Module:
        return build_segmentation_loss(self.cfg.segmae)

    def stages(self) -> list[Stage]:
        recipe = self.cfg.segmae
        out = [Stage("mae", recipe.mae_epochs)] if recipe.mae_epochs > 0 else []
        return out + [Stage("hybrid" if recipe.hybrid else "segment", self.cfg.epochs)]

    def configure_optimizers(self):
        opt, sched = super().configure_optimizers()
        if self.stage.name == "mae" and sched is not None and not steps_per_batch(sched):
            # Ours: constant lr while pre-training; the plateau rule watches validation Dice,
            # which this stage does not train.
            sched = None
        elif self.stage.name == "hybrid" and steps_per_batch(sched):
            # Two optimiser steps per batch, each stepping a per-step schedule.
            sched = build_scheduler(self.cfg.scheduler, opt, self.stage.epochs, 2 * self.steps_per_epoch)
        return opt, sched

    # ----------------------------------------------------------------------------- hooks

    def segmentation_modules(self) -> list[nn.Module]:
        return [self.model.decoder, self.model.head]

    def on_stage_start(self, stage: Stage) -> None:
        frozen = stage.name == "mae"  # Sec. 3.3: the segmentation branch stays frozen in pre-training
        for module in self.segmentation_modules():
            module.requires_grad_(not frozen)
        # (optimizer_per_stage: the engine now builds this stage's optimiser over the trainable parameters.)
        if stage.name != "mae" and self.epoch == self.stage_start_epoch:
            # Segmentation starts now: Dice measured behind a frozen, untrained decoder is no baseline.
            self.best_metric, self.best_epoch, self.bad_epochs = -math.inf, None, 0

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if self.stage.name == "mae":
            self.bad_epochs = 0  # early stopping watches segmentation, which this stage does not train

    # ----------------------------------------------------------------------------- steps

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.segmentation_step(batch)

    def segmentation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Eq. 11 on the (optionally masked) forward's segmentation logits."""
        if self.mae is None:
            out = self.forward(batch["image"])
        else:
            out = self.forward(batch["image"], mask_ratio=self.cfg.segmae.seg_mask_ratio)
        losses = self.loss_fn(segmentation_logits(out).float(), batch["mask"])
        return {"loss": losses["loss"], "seg_loss": losses["loss"], **{k: v for k, v in losses.items() if k != "loss"}}

    def reconstruction_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Eq. 12 on the MAE decoder's reconstruction of the masked patches."""
        out = self.forward(batch["image"], mask_ratio=self.model.cfg.mask_ratio, segment=False)
        target = self.model.encoder.prepare_input(batch["image"])
        loss = self.cfg.segmae.recon_weight * self.recon_loss_fn(out.reconstruction, target, out.mask)
        return {"loss": loss, "rec_loss": loss}

    def optimization_step(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.stage.name == "mae":
            return self.optimize(self.reconstruction_step, batch)
        seg = self.optimize(self.segmentation_step, batch)
        if self.stage.name != "hybrid":
            return seg
        rec = self.optimize(self.reconstruction_step, batch)  # Sec. 3.3: then a reconstruction step on the same batch
        return {**seg, **rec, "loss": seg["loss"] + rec["loss"]}


__all__ = ["SegMAERecipe", "SegMAETrainConfig", "SegMAETrainer", "build_reconstruction_loss", "build_segmentation_loss"]
