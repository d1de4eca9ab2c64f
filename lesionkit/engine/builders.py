"""Datasets, transforms, metrics and losses the engine builds from config values.

They come from :mod:`lesionkit.data`, :mod:`lesionkit.metrics` and :mod:`lesionkit.losses`.
"""

from __future__ import annotations

import torch
from torch import nn

from lesionkit.engine.config import DataConfig, LossConfig


def build_dataset(spec: str, image_size: int | None, transform=None) -> torch.utils.data.Dataset:
    """``lesionkit.data.from_spec(spec)`` resized to ``image_size``."""
    from lesionkit.data import from_spec

    return from_spec(spec, image_size=image_size, transform=transform)


def build_train_transform(data: DataConfig):
    """The per-image part of ``data.transforms`` (rotation, brightness, contrast, gray-world) for
    the training data loader, or ``None``. Its flips run per batch (the trainer's ``augment``)."""
    from lesionkit.data.transforms import split_transform_options, train_transforms

    _, per_image = split_transform_options(data.transforms)
    if not per_image:
        return None
    return train_transforms(hflip=0.0, vflip=0.0, **per_image)


def build_eval_transform(data: DataConfig | dict):
    """What evaluation must repeat of the training transforms (gray-world colour constancy), or ``None``."""
    from lesionkit.data.transforms import eval_transforms, split_transform_options

    options = data.transforms if isinstance(data, DataConfig) else dict(data.get("transforms") or {})
    _, per_image = split_transform_options(options)
    if not per_image.get("gray_world"):
        return None
    return eval_transforms(gray_world=True)


def build_metrics(threshold: float = 0.5, hd95: bool = True):
    """A streaming ``SegmentationMetrics`` over logits; HD95 (two distance transforms per image) optional."""
    from lesionkit.metrics import SegmentationMetrics

    return SegmentationMetrics(threshold=threshold, from_logits=True, compute_hd95=hd95)


def build_loss(cfg: LossConfig) -> nn.Module:
    """``lesionkit.losses.create_loss(cfg.name, **cfg.kwargs)`` (all take logits)."""
    from lesionkit.losses import create_loss

    return create_loss(cfg.name, **cfg.kwargs)
