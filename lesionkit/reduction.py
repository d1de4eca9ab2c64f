"""How a per-image loss becomes one number: the ``reduction`` argument of every lesionkit loss."""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction should be one of {REDUCTIONS}, got {reduction!r}")


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``loss`` (B,) averaged ("mean"), summed ("sum") or returned as it is ("none")."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


__all__ = ["REDUCTIONS", "check_reduction", "reduce_loss"]
