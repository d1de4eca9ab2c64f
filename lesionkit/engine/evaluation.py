"""Evaluate a model on a dataset: ``SegmentationMetrics`` plus per-image Dice for ranking cases."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lesionkit.engine.builders import build_metrics
from lesionkit.models import segmentation_logits


@dataclass
class EvaluationResult:
    metrics: dict  # SegmentationMetrics.compute()
    # (dataset index, image id, Dice) per image, in dataset order; ranks best and worst cases.
    per_image_dice: list[tuple[int, str, float]] = field(default_factory=list)


PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls and convolutions natively: a CUDA GPU with bf16
    support, or a CPU with AVX-512 BF16 or AMX. Elsewhere PyTorch's CPU bf16 kernels convert
    element by element and run several times slower than float32 (a ``unet_tiny`` training step
    took 9x as long under bf16 autocast on a 2-core AVX2 EPYC; docs/engine.md)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device runs it natively (:func:`native_bf16`), else
    ``fp32``; the other precisions as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision should be one of {list(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast_context(device: torch.device, precision: str):
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device, got {device}; use 'bf16' or 'fp32' on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def per_image_dice(logits: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """Dice per image of thresholded probabilities; 1 when prediction and target are both empty."""
    pred = (torch.sigmoid(logits.float()) > threshold).flatten(1)
    tgt = (target > 0.5).flatten(1)
    inter = (pred & tgt).sum(1).double()
    total = (pred.sum(1) + tgt.sum(1)).double()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, threshold: float = 0.5,
             precision: str = "fp32", progress: bool = False, desc: str = "eval", hd95: bool = True,
             model_inputs: tuple[str, ...] = (), loss_fn: nn.Module | None = None) -> EvaluationResult:
    """Run ``model`` over ``loader`` in eval mode; restores the model's train/eval mode after.

    ``model_inputs``: batch keys passed to the model as keyword inputs when a batch has them
    (GRCSF's cached ``residual_maps``). ``loss_fn(logits, mask)``, when given, adds the mean
    loss per image as ``metrics["loss"]`` (``monitor: loss``, GRCSF's early stopping)."""
    from tqdm import tqdm

    from lesionkit.engine.runtime import on_terminal

    was_training = model.training
    model.eval()
    metrics = build_metrics(threshold, hd95=hd95)
    ranked: list[tuple[int, str, float]] = []
    index = 0
    loss_sum = 0.0
    try:
        for batch in tqdm(loader, desc=desc, disable=not (progress and on_terminal()), leave=False, mininterval=1.0):
            image = batch["image"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            extra = {k: batch[k].to(device, non_blocking=True) for k in model_inputs if k in batch}
            with autocast_context(device, precision):
                logits = segmentation_logits(model(image, **extra))
            logits = logits.float()
            if loss_fn is not None:
                loss_sum += float(loss_fn(logits, mask)) * logits.shape[0]
            metrics.update(logits, mask)
            dice = per_image_dice(logits, mask, threshold).tolist()
            for image_id, d in zip(batch["id"], dice):
                ranked.append((index, str(image_id), float(d)))
                index += 1
    finally:
        model.train(was_training)
    computed = metrics.compute()
    if loss_fn is not None:
        computed["loss"] = loss_sum / max(1, index)
    return EvaluationResult(metrics=computed, per_image_dice=ranked)


def lower_is_better(monitor: str) -> bool:
    """Whether a smaller ``monitor`` value is better (losses and distances)."""
    return monitor == "loss" or monitor.endswith(("_loss", "hd95"))


def plain_metrics(value: Any) -> Any:
    """Numbers and containers as Python primitives (``weights_only``-safe)."""
    if isinstance(value, dict):
        return {str(k): plain_metrics(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_metrics(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """``{"dice": .., "per_image_dice": .., "isic_jaccard": ..}`` for logs."""
    out: dict[str, float] = {}
    for key, value in metrics.get("dataset", {}).items():
        out[key] = float(value)
    for key, value in metrics.get("per_image", {}).items():
        out[f"per_image_{key}"] = float(value)
    if "isic_jaccard" in metrics:
        out["isic_jaccard"] = float(metrics["isic_jaccard"])
    if "loss" in metrics:
        out["loss"] = float(metrics["loss"])
    return out


def monitor_value(metrics: dict, monitor: str) -> float:
    """The value of ``monitor`` ("dice", "per_image.dice", "isic_jaccard", ...) in ``compute()`` output."""
    if "." in monitor:
        group, key = monitor.split(".", 1)
        source = metrics.get(group, {})
    elif monitor in metrics.get("dataset", {}):
        source, key = metrics["dataset"], monitor
    else:
        source, key = metrics, monitor
    if key not in source or not isinstance(source[key], (int, float)):
        raise ValueError(f"monitor {monitor!r} is not among the validation metrics {sorted(flatten_metrics(metrics))}")
    return float(source[key])
