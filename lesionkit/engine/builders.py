"""Datasets, metrics and losses the engine builds from config strings.

They come from :mod:`lesionkit.data`, :mod:`lesionkit.metrics` and :mod:`lesionkit.losses`.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from lesionkit.engine.config import LossConfig


def _have(module: str) -> bool:
    # find_spec, not try/except ImportError: a real import error inside the package must surface.
    # A folder without __init__.py (a namespace package) does not count.
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin is not None


def build_dataset(spec: str, image_size: int | None) -> torch.utils.data.Dataset:
    """``lesionkit.data.from_spec(spec)`` resized to ``image_size``."""
    if _have("lesionkit.data"):
        from lesionkit.data import from_spec
    else:
        from lesionkit.engine._fallback import from_spec
    return from_spec(spec, image_size=image_size)


def build_metrics(threshold: float = 0.5):
    """A streaming ``SegmentationMetrics`` over logits."""
    if _have("lesionkit.metrics"):
        from lesionkit.metrics import SegmentationMetrics
    else:
        from lesionkit.engine._fallback import SegmentationMetrics
    return SegmentationMetrics(threshold=threshold, from_logits=True)


def build_loss(cfg: LossConfig) -> nn.Module:
    """The segmentation loss the config names (from logits)."""
    if cfg.name == "bce_dice":
        from lesionkit.engine._fallback import BCEDiceLoss

        return BCEDiceLoss(**cfg.kwargs)
    raise ValueError(f"loss.name should be one of ['bce_dice'], got {cfg.name!r}")
