"""MAE training for GRCSF's residual maps on the engine's :class:`Trainer` (``trainer: mae``).

GRCSF (Sec. 4) trains its MAE with the MSE loss at mask ratios 50 % and 75 %; here each step
draws its ratio from ``mae.mask_ratios`` (from torch's generator, so a resume repeats the
draws) and minimises MAE's loss: the mean squared error over the masked patches
(:class:`~lesionkit.losses.reconstruction.MAEReconstructionLoss`), on pixels in [0, 1] since the
residual maps compare pixels. Validation, when there is validation data, reports the PSNR of
the masked pixels under fixed maskings (``monitor: psnr`` in the recipes picks best.pt by it).
The models are ``mae_vit_base`` / ``mae_vit_tiny`` (:mod:`lesionkit.models.mae`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lesionkit.engine.config import TrainConfig
from lesionkit.engine.evaluation import autocast_context
from lesionkit.engine.trainer import Trainer
from lesionkit.layers.patch_masking import random_patch_mask
from lesionkit.losses.reconstruction import MAEReconstructionLoss


@dataclass
class MAERecipe:
    mask_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75])  # GRCSF Sec. 4
    norm_pix_loss: bool = False  # MAE's per-patch normalised target; off: the maps compare raw pixels

    def __post_init__(self) -> None:
        if not self.mask_ratios or any(not 0.0 < float(r) < 1.0 for r in self.mask_ratios):
            raise ValueError(f"mae.mask_ratios should list mask ratios in (0, 1), got {self.mask_ratios}")


@dataclass
class MAETrainConfig(TrainConfig):
    trainer: str = "mae"
    monitor: str = "psnr"
    mae: MAERecipe = field(default_factory=MAERecipe)


class MAETrainer(Trainer):
    config_class = MAETrainConfig
    pretraining = "make GRCSF's residual maps with: lesionkit residual-maps --checkpoint {out}/last.pt --data SPEC --out DIR"

    def __init__(self, config: MAETrainConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        from lesionkit.models.mae import MaskedAutoencoder

        if not isinstance(self.model, MaskedAutoencoder):
            raise ValueError(f"trainer 'mae' trains the MAEs (mae_vit_base, mae_vit_tiny), got model "
                             f"{config.model.name!r} ({type(self.model).__name__})")

    def build_loss(self):
        return MAEReconstructionLoss(self.model.patch_size, norm_pix=self.cfg.mae.norm_pix_loss)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        ratios = self.cfg.mae.mask_ratios
        ratio = float(ratios[int(torch.randint(len(ratios), ()))])
        out = self.forward(batch["image"], mask_ratio=ratio)
        loss = self.loss_fn(out.reconstruction.float(), batch["image"], out.mask)
        return {"loss": loss}

    @torch.no_grad()
    def validate(self) -> dict | None:
        """PSNR of the masked pixels over the validation images, each ratio with a fixed masking."""
        if self.val_loader is None or not self.dist.is_main:
            return None
        model, was_training = self.model, self.model.training
        model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed)
        loss_fn = MAEReconstructionLoss(model.patch_size)
        total, count = 0.0, 0
        try:
            for batch in self.val_loader:
                image = batch["image"].to(self.device)
                grid = model.grid_size(image)
                for ratio in self.cfg.mae.mask_ratios:
                    pm = random_patch_mask(image.shape[0], grid[0] * grid[1], float(ratio), generator=gen)
                    pm.ids_keep, pm.ids_restore, pm.mask = (t.to(self.device) for t in (pm.ids_keep, pm.ids_restore, pm.mask))
                    with autocast_context(self.device, self.precision):
                        out = model(image, mask=pm)
                    total += float(loss_fn(out.reconstruction.float(), image, out.mask)) * image.shape[0]
                    count += image.shape[0]
        finally:
            model.train(was_training)
        mse = total / max(1, count)
        return {"dataset": {"psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "masked_mse": mse}}


__all__ = ["MAERecipe", "MAETrainConfig", "MAETrainer"]
