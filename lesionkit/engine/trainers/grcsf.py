"""GRCSF's segmentation training on the engine's :class:`Trainer` (``trainer: grcsf``).

The pipeline (Sec. 3.4): an MAE (``trainer: mae``) -> its residual maps
(``lesionkit residual-maps``, cached) -> this trainer, which

- builds the GRCSF model with the MAE of ``grcsf.mae_checkpoint`` inside it, frozen: its weights
  are saved in every GRCSF checkpoint, so ``lesionkit evaluate`` / ``predict`` compute the maps
  of new images themselves (the same seeded maps, :mod:`lesionkit.engine.trainers.residual_maps`);
- pairs each training and validation image with its cached maps from ``grcsf.residual_maps``
  (batch key ``residual_maps``; the flips of ``data.transforms`` move them with the image). A
  missing map stops the run with the image's name and the command that makes it. Without
  ``grcsf.residual_maps`` the model computes the maps on the fly (slower, same maps);
- trains with the configured loss (the recipes: Dice + focal, alpha 0.25, gamma 2, Eq. 7),
  Adam 1e-4 with a 5-epoch warm-up and early stopping after 10 epochs without improvement (the
  recipes' ``optim``, ``scheduler`` and ``early_stopping_patience``).

Per-image augmentation (rotation, brightness, contrast) would change the image after its maps
were made, so with cached maps only the batch flips are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lesionkit.engine.config import TrainConfig
from lesionkit.engine.trainer import Trainer
from lesionkit.models import segmentation_logits


@dataclass
class GRCSFRecipe:
    mae_checkpoint: str | None = None  # a trainer: mae checkpoint (best.pt / last.pt)
    residual_maps: str | None = None  # the residual-maps cache folder (--out); None: computed on the fly


@dataclass
class GRCSFTrainConfig(TrainConfig):
    trainer: str = "grcsf"
    grcsf: GRCSFRecipe = field(default_factory=GRCSFRecipe)


class GRCSFTrainer(Trainer):
    config_class = GRCSFTrainConfig
    model_inputs = ("residual_maps",)

    def __init__(self, config: GRCSFTrainConfig, **kwargs) -> None:
        self.mae_hash: str | None = None
        super().__init__(config, **kwargs)
        self.batch_flips.extra_keys = ("residual_maps",)

    def build_model(self) -> nn.Module:
        from lesionkit.engine.trainers.residual_maps import load_mae
        from lesionkit.models import create_model
        from lesionkit.models.grcsf import GRCSF

        cfg, recipe = self.cfg, self.cfg.grcsf
        kwargs = dict(cfg.model.kwargs)
        mae_state = None
        if recipe.mae_checkpoint:
            mae, state, self.mae_hash = load_mae(recipe.mae_checkpoint)
            kwargs["mae"] = {"name": state["model_name"], "kwargs": dict(state["model_kwargs"])}
            mae_state = mae.state_dict()
        model = create_model(cfg.model.name, **kwargs)
        if not isinstance(model, GRCSF):
            raise ValueError(f"trainer 'grcsf' trains grcsf_unetpp / grcsf_tiny, got model {cfg.model.name!r}")
        if model.cfg.use_rcu and model.mae is None:
            raise ValueError("grcsf.mae_checkpoint is not set: the RCU needs residual maps from a trained MAE "
                             "(lesionkit train --config grcsf_mae_tiny_isic2018 --data SPEC, then "
                             "--set grcsf.mae_checkpoint=runs/grcsf_mae_tiny_isic2018/best.pt)")
        if mae_state is not None:
            model.mae.load_state_dict(mae_state)
        # The checkpoint header records the model options: with the MAE's, it rebuilds on its own.
        cfg.model.kwargs = kwargs
        return model

    def build_datasets(self):
        train, val = super().build_datasets()
        recipe, data = self.cfg.grcsf, self.cfg.data
        if not recipe.residual_maps or not self.model.cfg.use_rcu:
            return train, val
        if not recipe.mae_checkpoint:
            raise ValueError(f"grcsf.residual_maps={recipe.residual_maps!r} needs grcsf.mae_checkpoint, the MAE "
                             "the maps were made with (their cache is keyed by its hash)")
        from lesionkit.data.transforms import split_transform_options
        from lesionkit.engine.trainers.residual_maps import ResidualMapCache, ResidualMapDataset, make_command

        per_image = {k: v for k, v in split_transform_options(data.transforms)[1].items() if k != "gray_world" and v}
        if per_image:
            raise ValueError(f"data.transforms {sorted(per_image)} change each image after its residual maps were "
                             "cached; use the flips (hflip, vflip, rot90) or grcsf.residual_maps=null (maps on the fly)")
        cache = ResidualMapCache(recipe.residual_maps, self.mae_hash, self.model.residual_settings)

        def paired(dataset, spec):
            command = make_command(recipe.mae_checkpoint, spec, recipe.residual_maps, data.image_size,
                                   self.model.residual_settings)
            return ResidualMapDataset(dataset, cache, command)

        train = paired(train, data.train)
        val = None if val is None else paired(val, data.val or data.train)
        for dataset in (train, val):  # fail before training when the maps were never made
            if dataset is not None and len(dataset):
                dataset[0]
        return train, val

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = segmentation_logits(self.forward(batch["image"], residual_maps=batch.get("residual_maps")))
        return {"loss": self.loss_fn(logits.float(), batch["mask"])}


__all__ = ["GRCSFRecipe", "GRCSFTrainConfig", "GRCSFTrainer"]
