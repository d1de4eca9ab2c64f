"""Per-step learning-rate schedules with linear warm-up; ``build_scheduler`` maps the config.

The classes keep only numbers in their state, so checkpoints load with ``weights_only=True``
(``LambdaLR`` would need the lambda pickled).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lesionkit.engine.config import SchedulerConfig


class WarmupCosineLR(LRScheduler):
    """Linear warm-up to the base lr over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.

    The warm-up starts at ``warmup_start`` times the base lr (0: from ``min_lr``, ours; 0.1: the
    tenfold rise of GRCSF's Sec. 4). When the trainer measures progress by time
    (``time_progress``, ``scheduler.horizon: time_budget``), the warm-up also ends once
    ``warmup_max_fraction`` of the budget is spent, whatever ``warmup_steps`` says, so a slow
    model is not still warming up when its budget runs out; the decay then runs over the rest
    of the budget, from where the warm-up ended.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 half_period_steps: int | None = None, warmup_start: float = 0.0,
                 warmup_max_fraction: float | None = None) -> None:
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_lr = float(min_lr)
        self.warmup_start = float(warmup_start)
        self.warmup_max_fraction = None if warmup_max_fraction is None else float(warmup_max_fraction)
        # Periodic cosine (torch's CosineAnnealingLR closed form): down over half_period_steps,
        # up over the next, and so on; None = one decay over total_steps.
        self.half_period_steps = None if half_period_steps is None else max(1, int(half_period_steps))
        # Fraction of the run done, when the trainer measures it by time (scheduler.horizon
        # "time_budget"); None = count steps.
        self.time_progress: float | None = None
        self.warmup_end_progress: float | None = None  # time_progress when the warm-up ended
        super().__init__(optimizer)

    def _in_warmup(self, step: int) -> bool:
        if step < self.warmup_steps:
            if (self.time_progress is None or self.warmup_max_fraction is None
                    or self.time_progress < self.warmup_max_fraction):
                return True
            self.warmup_steps = step  # the budget's share for the warm-up is spent: end it here
        if self.time_progress is not None and self.warmup_end_progress is None:
            self.warmup_end_progress = min(self.time_progress, 0.999) if self.warmup_steps else 0.0
        return False

    def _ramp(self, step: int) -> float:
        return self.warmup_start + (1.0 - self.warmup_start) * (step + 1) / (self.warmup_steps + 1)

    def _decay_progress(self, step: int) -> float:
        if self.time_progress is not None:
            start = self.warmup_end_progress or 0.0
            return min(1.0, max(0.0, (self.time_progress - start) / (1.0 - start)))
        return min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))

    def _factor(self, step: int) -> float:
        if self._in_warmup(step):
            return self._ramp(step)
        if self.half_period_steps is not None:
            return 0.5 * (1.0 + math.cos(math.pi * (step - self.warmup_steps) / self.half_period_steps))
        return 0.5 * (1.0 + math.cos(math.pi * self._decay_progress(step)))

    def get_lr(self) -> list[float]:
        f = self._factor(self.last_epoch)
        return [self.min_lr + (base - self.min_lr) * f for base in self.base_lrs]


class WarmupPolyLR(WarmupCosineLR):
    """Linear warm-up, then ``(1 - progress) ** power`` decay (the nnU-Net / DeepLab "poly" rule)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 power: float = 0.9, warmup_start: float = 0.0, warmup_max_fraction: float | None = None) -> None:
        self.power = float(power)
        super().__init__(optimizer, total_steps, warmup_steps, min_lr, None, warmup_start, warmup_max_fraction)

    def _factor(self, step: int) -> float:
        if self._in_warmup(step):
            return self._ramp(step)
        return (1.0 - self._decay_progress(step)) ** self.power


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                    total_steps: int | None = None):
    """The scheduler the config names, or ``None``. Cosine and poly step per batch, plateau per epoch.

    ``steps_per_epoch`` counts optimiser steps (it scales the warm-up); ``total_steps``, when
    given, replaces ``epochs * steps_per_epoch`` (a schedule over several stages)."""
    total = epochs * steps_per_epoch if total_steps is None else total_steps
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.name == "none":
        return None
    if cfg.t_max_epochs is not None and (cfg.name != "cosine" or cfg.t_max_epochs <= 0):
        raise ValueError(f"scheduler.t_max_epochs applies to a cosine schedule and must be > 0, got {cfg.t_max_epochs} "
                         f"with scheduler.name {cfg.name!r}")
    if not 0.0 <= cfg.warmup_start <= 1.0:
        raise ValueError(f"scheduler.warmup_start should be in [0, 1] (a fraction of the base lr), got {cfg.warmup_start}")
    if not 0.0 < cfg.warmup_max_fraction <= 1.0:
        raise ValueError(f"scheduler.warmup_max_fraction should be in (0, 1], got {cfg.warmup_max_fraction}")
    cap = cfg.warmup_max_fraction if cfg.horizon == "time_budget" else None
    if cfg.name == "cosine":
        half_period = None if cfg.t_max_epochs is None else round(cfg.t_max_epochs * steps_per_epoch)
        return WarmupCosineLR(optimizer, total, warmup, cfg.min_lr, half_period, cfg.warmup_start, cap)
    if cfg.name == "poly":
        return WarmupPolyLR(optimizer, total, warmup, cfg.min_lr, cfg.power, cfg.warmup_start, cap)
    if cfg.name == "plateau":
        # Maximises the monitored validation metric (Dice by default).
        return ReduceLROnPlateau(optimizer, mode="max", factor=cfg.factor, patience=cfg.patience, min_lr=cfg.min_lr)
    raise ValueError(f"scheduler.name should be one of ['none', 'cosine', 'poly', 'plateau'], got {cfg.name!r}")


def steps_per_batch(scheduler) -> bool:
    return scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau)
