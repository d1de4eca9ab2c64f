"""CM-SSM's loss on the engine's :class:`Trainer` (``trainer: cmssm``): L_total = L_fd +
L_BceDice (Eq. 11), with L_fd = lambda1 L_CFD + lambda2 L_IFD (Eq. 10).

The segmentation part is the configured ``loss`` (the recipes: ``bce_dice`` with weights 0.3 /
0.7). The distillation part comes from the model: a ``cmssm_unet`` / ``cmssm_tiny`` returns the
already weighted ``cfd_loss`` / ``ifd_loss`` in ``SegmentationOutput.extras`` while training
(the model's ``cfd`` / ``ifd`` switches and ``cfd_weight`` / ``ifd_weight``). Other models train
as with the default trainer.
"""

from __future__ import annotations

import torch

from lesionkit.engine.trainer import Trainer
from lesionkit.models import SegmentationOutput, segmentation_logits

FD_TERMS = ("cfd_loss", "ifd_loss")


class CMSSMTrainer(Trainer):
    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        output = self.forward(batch["image"])
        seg = self.loss_fn(segmentation_logits(output).float(), batch["mask"])
        extras = output.extras if isinstance(output, SegmentationOutput) else {}
        fd = {k: extras[k].float() for k in FD_TERMS if k in extras}
        total = seg + sum(fd.values()) if fd else seg
        return {"loss": total, "seg_loss": seg, **fd}
