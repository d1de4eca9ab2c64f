"""Datasets, transforms, metrics and losses the engine builds from config values.

They come from :mod:`lesionkit.data`, :mod:`lesionkit.metrics` and :mod:`lesionkit.losses`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lesionkit.engine.config import DataConfig, LossConfig

# data.transforms keys; normalisation is the model's business (models take images in [0, 1]).
TRANSFORM_KEYS = ("hflip", "vflip", "rotation", "brightness", "contrast", "gray_world")


def build_dataset(spec: str, image_size: int | None, transform=None) -> torch.utils.data.Dataset:
    """``lesionkit.data.from_spec(spec)`` resized to ``image_size``."""
    from lesionkit.data import from_spec

    return from_spec(spec, image_size=image_size, transform=transform)


def _check_transforms(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(TRANSFORM_KEYS))
    if unknown:
        raise ValueError(f"data.transforms has unknown key(s) {unknown}; valid: {list(TRANSFORM_KEYS)}")


def build_train_transform(data: DataConfig):
    """Paired per-image augmentation from ``data.transforms``, or ``None``.

    Flips default to off here: ``data.augment`` flips whole batches more cheaply.
    """
    if not data.transforms:
        return None
    _check_transforms(data.transforms)
    from lesionkit.data import train_transforms

    return train_transforms(**{"hflip": 0.0, "vflip": 0.0, **data.transforms})


def build_eval_transform(data: DataConfig | dict):
    """What evaluation must repeat of the training transforms (gray-world colour constancy), or ``None``."""
    options = data.transforms if isinstance(data, DataConfig) else dict(data.get("transforms") or {})
    _check_transforms(options)
    if not options.get("gray_world"):
        return None
    from lesionkit.data import eval_transforms

    return eval_transforms(gray_world=True)


def build_metrics(threshold: float = 0.5, hd95: bool = True):
    """A streaming ``SegmentationMetrics`` over logits; HD95 (two distance transforms per image) optional."""
    from lesionkit.metrics import SegmentationMetrics

    return SegmentationMetrics(threshold=threshold, from_logits=True, compute_hd95=hd95)


def build_loss(cfg: LossConfig) -> nn.Module:
    """``lesionkit.losses.create_loss(cfg.name, **cfg.kwargs)`` (all take logits)."""
    from lesionkit.losses import create_loss

    return create_loss(cfg.name, **cfg.kwargs)
