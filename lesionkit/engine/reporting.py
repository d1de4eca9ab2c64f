"""Evaluation outputs shared by ``lesionkit evaluate`` and ``lesionkit demo``: table, JSON, overlay grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from lesionkit.engine.evaluation import EvaluationResult
from lesionkit.engine.overlays import grid, overlay
from lesionkit.models import segmentation_logits

METRIC_ORDER = ("dice", "iou", "sensitivity", "specificity", "accuracy", "precision", "fpr", "voe", "hd95")


def metrics_table(metrics: dict) -> str:
    """Dataset-level and per-image columns side by side, then the ISIC score."""
    dataset, per_image = metrics.get("dataset", {}), metrics.get("per_image", {})
    names = [m for m in METRIC_ORDER if m in dataset or m in per_image]
    names += [m for m in dataset if m not in names]

    def fmt(v) -> str:
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else str(v))

    lines = [f"{'metric':<12} {'dataset':>9} {'per-image':>9}"]
    lines += [f"{m:<12} {fmt(dataset.get(m)):>9} {fmt(per_image.get(m)):>9}" for m in names]
    if "isic_jaccard" in metrics:
        lines.append(f"{'isic_jaccard':<12} {fmt(metrics['isic_jaccard']):>9}")
    lines.append(f"{'images':<12} {metrics.get('n_images', '-'):>9}")
    return "\n".join(lines)


def write_metrics_json(metrics: dict, path: Path) -> None:
    # NaN (e.g. HD95 of an empty mask) is written as null: strict JSON readers reject NaN.
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    path.write_text(json.dumps(clean(metrics), indent=2) + "\n")


@torch.no_grad()
def best_worst_grid(model: nn.Module, dataset, result: EvaluationResult, path: Path, device: torch.device,
                    k: int = 4, threshold: float = 0.5) -> None:
    """Overlay grid: the ``k`` best cases on the top row, the ``k`` worst below (by per-image Dice)."""
    ranked = sorted(result.per_image_dice, key=lambda r: r[2], reverse=True)
    k = min(k, max(1, len(ranked) // 2)) if len(ranked) > 1 else len(ranked)
    chosen = ranked[:k] + ranked[-k:] if len(ranked) > 1 else ranked
    model.eval()
    tiles = []
    for rank, (index, image_id, dice) in enumerate(chosen):
        item = dataset[index]
        logits = segmentation_logits(model(item["image"][None].to(device))).float()
        pred = torch.sigmoid(logits[0, 0]).cpu() > threshold
        label = "best" if rank < k else "worst"
        tiles.append((overlay(item["image"], pred, item["mask"]), f"{label} {image_id[-20:]} {dice:.3f}"))
    grid(tiles, columns=max(1, k)).save(path)
