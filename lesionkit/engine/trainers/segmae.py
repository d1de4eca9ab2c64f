"""SegMAE's two-stage recipe on the engine's :class:`Trainer` (``trainer: segmae``).

Stage ``mae`` (``segmae.mae_epochs``, paper: 50): reconstruction only - the encoder and the MAE
decoder learn to restore masked patches while the segmentation decoder is frozen (Sec. 3.3).
Stage ``hybrid`` (``epochs``, paper: 100): every iteration takes one segmentation step
(lambda1 BCE + lambda2 Dice + lambda3 patch-wise loss, Eq. 11) and then one reconstruction step
(the masked, patch-weighted MSE, Eq. 12) on the same batch, each with its own backward and
optimiser update. ``segmae.hybrid: false`` leaves the segmentation step alone (Table 4 row 1).
``segmae.stage_transition`` says whether stage 2 continues stage 1's optimiser and schedule (ours,
the default) or restarts them; ``segmae.optimizers`` whether the two tasks share an optimiser.

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
from lesionkit.engine.builders import build_optimizer
from lesionkit.engine.schedulers import build_scheduler, steps_per_batch
from lesionkit.engine.trainer import Stage, Trainer
from lesionkit.losses.segmae import PATCHWISE_SCALES, SegMAEReconstructionLoss, SegMAESegmentationLoss
from lesionkit.models import segmentation_logits


STAGE_TRANSITIONS = ("continue", "restart")
OPTIMIZER_MODES = ("shared", "per_task")


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
    # Ours (the paper does not say how stage 2 takes over from stage 1): "continue" keeps the
    # optimiser state and runs one learning-rate schedule over both stages, so the warm-up happens
    # once, at the start; "restart" gives stage 2 a fresh optimiser and schedule, warm-up included.
    stage_transition: str = "continue"
    # "shared": one optimiser takes the segmentation and the reconstruction updates, so the
    # encoder's moments mix the two tasks; "per_task": each task has its own (segmentation:
    # encoder, CUP, head; reconstruction: encoder, MAE decoder), on the same schedule.
    optimizers: str = "shared"

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
        if self.stage_transition not in STAGE_TRANSITIONS:
            raise ValueError(f"segmae.stage_transition should be one of {list(STAGE_TRANSITIONS)}, got {self.stage_transition!r}")
        if self.optimizers not in OPTIMIZER_MODES:
            raise ValueError(f"segmae.optimizers should be one of {list(OPTIMIZER_MODES)}, got {self.optimizers!r}")
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
    """Two-stage SegMAE training of a SegMAE model; a TransUNet trains with the same losses, one stage.

    With ``segmae.optimizers: per_task`` the reconstruction updates go through
    ``rec_optimizer`` / ``rec_scheduler`` (saved in checkpoints beside the engine's pair), the
    segmentation updates through the engine's ``optimizer`` / ``scheduler``.
    """

    config_class = SegMAETrainConfig
    ddp_find_unused_parameters = True  # each step uses one decoder only

    def __init__(self, config: SegMAETrainConfig, **kwargs) -> None:
        self.rec_optimizer: torch.optim.Optimizer | None = None
        self.rec_scheduler = None
        self._plateau = None  # "continue" with a plateau rule: held back while stage 1 runs
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
        # "restart": the engine rebuilds the optimiser(s) and schedule(s) when a stage begins (stage 1
        # trains without the CUP) and a resume at the stage boundary starts stage 2 with fresh ones.
        self.optimizer_per_stage = recipe.stage_transition == "restart"

    # ----------------------------------------------------------------------------- builders

    def build_loss(self) -> nn.Module:
        return build_segmentation_loss(self.cfg.segmae)

    def stages(self) -> list[Stage]:
        recipe = self.cfg.segmae
        out = [Stage("mae", recipe.mae_epochs)] if recipe.mae_epochs > 0 else []
        return out + [Stage("hybrid" if recipe.hybrid else "segment", self.cfg.epochs)]

    def per_task(self) -> bool:
        return self.cfg.segmae.optimizers == "per_task" and getattr(self.model, "mae", None) is not None

    def _updates_per_batch(self, stage: Stage, task: str) -> int:
        """Optimiser steps per batch that the ``task`` optimiser ("seg": the engine's) takes in ``stage``."""
        if self.per_task():
            return int(task == "rec" if stage.name == "mae" else task == "seg" or stage.name == "hybrid")
        return 2 if stage.name == "hybrid" else 1

    def configure_optimizers(self):
        """The segmentation optimiser and schedule (and, ``per_task``, the reconstruction pair).

        "continue": called once, with every parameter trainable; each schedule spans all stages in
        the optimiser steps it will take (a per-task segmentation schedule is moved to stage 1's
        end when stage 2 begins, see :meth:`on_epoch_start`). "restart": called for each stage.
        """
        recipe, cfg, spe = self.cfg.segmae, self.cfg, self.steps_per_epoch
        mae = getattr(self.model, "mae", None)
        if self.per_task():
            mae_ids = {id(p) for p in mae.parameters()}
            seg_ids = {id(p) for m in (self.model.decoder, self.model.head) for p in m.parameters()}
            opt = build_optimizer(cfg.optim, self.model, include=lambda _, p: id(p) not in mae_ids)
            self.rec_optimizer = build_optimizer(cfg.optim, self.model, include=lambda _, p: id(p) not in seg_ids)
        else:
            opt = build_optimizer(cfg.optim, self.model)
        restart = recipe.stage_transition == "restart"
        stages = [self.stage] if restart else self.stages()

        def schedule(optimizer, task):
            if self.per_task() and task == "seg" and not restart:
                total = sum(s.epochs for s in stages) * spe  # it joins the shared clock at stage 2
            else:
                total = sum(s.epochs * self._updates_per_batch(s, task) for s in stages) * spe
            rate = max(1, self._updates_per_batch(stages[0], task))
            return build_scheduler(cfg.scheduler, optimizer, stages[0].epochs, rate * spe, total_steps=total)

        sched = schedule(opt, "seg")
        self.rec_scheduler = schedule(self.rec_optimizer, "rec") if self.rec_optimizer is not None else None
        if sched is not None and not steps_per_batch(sched):
            # Ours: constant lr while pre-training; the plateau rule watches validation Dice, which
            # stage 1 does not train. The reconstruction optimiser follows the segmentation rate.
            self.rec_scheduler = None
            if restart and self.stage.name == "mae":
                sched = None
            elif not restart:
                self._plateau = sched
                sched = None if self.stage.name == "mae" else sched
        return opt, sched

    # ----------------------------------------------------------------------------- hooks

    def segmentation_modules(self) -> list[nn.Module]:
        return [self.model.decoder, self.model.head]

    def on_stage_start(self, stage: Stage) -> None:
        frozen = stage.name == "mae"  # Sec. 3.3: the segmentation branch stays frozen in pre-training
        for module in self.segmentation_modules():
            module.requires_grad_(not frozen)
        # ("restart": the engine now builds this stage's optimiser over the trainable parameters;
        # "continue": the frozen parameters get no gradient, so the optimiser leaves them be.)
        if self._plateau is not None:
            self.scheduler = None if frozen else self._plateau
        if stage.name != "mae" and self.epoch == self.stage_start_epoch:
            # Segmentation starts now: Dice measured behind a frozen, untrained decoder is no baseline.
            self.best_metric, self.best_epoch, self.bad_epochs = -math.inf * self.monitor_sign, None, 0

    def on_epoch_start(self, epoch: int) -> None:
        # "continue", per_task: the segmentation schedule starts where stage 1 left the shared clock
        # (after a resume too: this runs once the checkpoint's state has loaded).
        sched, recipe = self.scheduler, self.cfg.segmae
        if (self.stage.name != "mae" and self.per_task() and recipe.stage_transition == "continue"
                and steps_per_batch(sched) and sched.last_epoch < recipe.mae_epochs * self.steps_per_epoch):
            sched.last_epoch = recipe.mae_epochs * self.steps_per_epoch
            sched._last_lr = sched.get_lr()
            for group, lr in zip(sched.optimizer.param_groups, sched._last_lr):
                group["lr"] = lr

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if self.stage.name == "mae":
            self.bad_epochs = 0  # early stopping watches segmentation, which this stage does not train
        elif self.rec_optimizer is not None and self.rec_scheduler is None and self.scheduler is not None:
            for group in self.rec_optimizer.param_groups:  # a plateau rule sets both tasks' rate
                group["lr"] = self.optimizer.param_groups[0]["lr"]

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self, full: bool = True) -> dict:
        state = super().state_dict(full)
        if full and self.rec_optimizer is not None:
            state["rec_optimizer"] = self.rec_optimizer.state_dict()
            state["rec_scheduler"] = self.rec_scheduler.state_dict() if self.rec_scheduler is not None else None
        return state

    def load_resume_state(self, state: dict) -> None:
        super().load_resume_state(state)
        fresh_stage = state.get("stage") != self.stage.name and self.optimizer_per_stage
        if self.rec_optimizer is None or fresh_stage:
            return
        if "rec_optimizer" not in state:
            raise ValueError("the checkpoint has no reconstruction optimiser state (written with segmae.optimizers: shared); "
                             "resume with the optimizers setting it was written with")
        self.rec_optimizer.load_state_dict(state["rec_optimizer"])
        if self.rec_scheduler is not None and state.get("rec_scheduler") is not None:
            horizon = getattr(self.rec_scheduler, "total_steps", None)
            self.rec_scheduler.load_state_dict(state["rec_scheduler"])
            if horizon is not None:
                self.rec_scheduler.total_steps = horizon

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

    def reconstruct(self, batch: dict) -> dict[str, torch.Tensor]:
        """One reconstruction update, through the task's own optimiser when ``per_task``."""
        if self.rec_optimizer is None:
            return self.optimize(self.reconstruction_step, batch)
        return self.optimize(self.reconstruction_step, batch, self.rec_optimizer, self.rec_scheduler)

    def optimization_step(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.stage.name == "mae":
            return self.reconstruct(batch)
        seg = self.optimize(self.segmentation_step, batch)
        if self.stage.name != "hybrid":
            return seg
        rec = self.reconstruct(batch)  # Sec. 3.3: then a reconstruction step on the same batch
        return {**seg, **rec, "loss": seg["loss"] + rec["loss"]}


__all__ = ["OPTIMIZER_MODES", "STAGE_TRANSITIONS", "SegMAERecipe", "SegMAETrainConfig", "SegMAETrainer", "build_reconstruction_loss", "build_segmentation_loss"]
