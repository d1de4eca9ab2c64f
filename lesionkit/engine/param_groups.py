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
                     include: Callable[[str, nn.Parameter], bool] | None = None,
                     lr: float | None = None) -> list[dict[str, Any]]:
    """``[{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]`` over the trainable
    parameters (those ``include(name, param)`` accepts, when given); a single group when nothing
    is exempt (or ``weight_decay`` is 0).

    A parameter carrying ``_lr_scale = s`` (GRCSF's RCU gates, ``rcu_gate_lr_scale``) goes to a
    group of its own with ``"lr": lr * s``; ``lr`` is then required."""
    exempt_names = no_weight_decay_names(model)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and (include is None or include(name, p)):
            exempt = name in exempt_names and weight_decay != 0
            scale = float(getattr(p, "_lr_scale", 1.0))
            groups.setdefault((exempt, scale), []).append(p)
    if not groups:
        return [{"params": []}]
    if any(scale != 1.0 for _, scale in groups) and lr is None:
        raise ValueError("parameters with an _lr_scale need the base lr (parameter_groups(..., lr=...))")
    out = []
    for (exempt, scale), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != 1.0, kv[0][1])):
        group: dict[str, Any] = {"params": params}
        if exempt:
            group["weight_decay"] = 0.0
        if scale != 1.0:
            group["lr"] = lr * scale
        out.append(group)
    return out


__all__ = ["no_weight_decay_names", "parameter_groups"]
