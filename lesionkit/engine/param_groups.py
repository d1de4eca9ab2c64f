"""Optimiser parameter groups that honour a model's no-weight-decay marking.

A parameter is exempt from weight decay when it carries ``_no_weight_decay = True`` (Mamba's
and VMamba's marking of ``A_logs`` and ``Ds``; :func:`lesionkit.layers.ss2d.mark_no_weight_decay`)
or when its name is in the model's ``no_weight_decay()`` set (timm's convention).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    names = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    for name, p in model.named_parameters():
        if getattr(p, "_no_weight_decay", False):
            names.add(name)
    return names


def parameter_groups(model: nn.Module, weight_decay: float,
                     include: Callable[[str, nn.Parameter], bool] | None = None) -> list[dict[str, Any]]:
    """``[{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]`` over the trainable
    parameters (those ``include(name, param)`` accepts, when given); a single group when nothing
    is exempt (or ``weight_decay`` is 0)."""
    exempt_names = no_weight_decay_names(model)
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and (include is None or include(name, p)):
            (exempt if name in exempt_names else decay).append(p)
    if not exempt or weight_decay == 0:
        return [{"params": decay + exempt}]
    return [{"params": decay}, {"params": exempt, "weight_decay": 0.0}]


__all__ = ["no_weight_decay_names", "parameter_groups"]
