"""Segmentation metrics: streaming dataset-level and per-image scores (docs/data.md, Metrics)."""

from lesionkit.metrics.segmentation import (
    ISIC_JACCARD_THRESHOLD,
    METRIC_NAMES,
    SegmentationMetrics,
    boundary,
    confusion_metrics,
    hd95,
    surface_distances,
)

__all__ = [
    "ISIC_JACCARD_THRESHOLD",
    "METRIC_NAMES",
    "SegmentationMetrics",
    "boundary",
    "confusion_metrics",
    "hd95",
    "surface_distances",
]
