"""Datasets, transforms, metrics, losses and optimisers the engine builds from config values.

They come from :mod:`lesionkit.data`, :mod:`lesionkit.metrics`, :mod:`lesionkit.losses` and torch.optim.
"""

from __future__ import annotations

import torch
from torch import nn

from lesionkit.engine.config import DataConfig, LossConfig, OptimConfig


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


def build_train_val_datasets(data: DataConfig, seed: int) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """The training and validation datasets of ``data``: ``data.val``, or a seeded ``data.val_fraction``
    held out of ``data.train`` (without the training augmentation), or no validation when that is 0."""
    from lesionkit.data.check import check_files
    from lesionkit.data.splits import holdout_split

    if not data.train:
        raise ValueError("data.train is not set: give a data spec such as 'synthetic:200' or 'isic:PATH:train'")
    train_tf, eval_tf = build_train_transform(data), build_eval_transform(data)
    train = build_dataset(data.train, data.image_size, train_tf)
    check_files(train, data.train)
    if data.val:
        val = build_dataset(data.val, data.image_size, eval_tf)
        check_files(val, data.val)
        return train, val
    if data.val_fraction == 0:
        return train, None
    # The held-out part must not see the training augmentation: same indices, own dataset.
    plain = build_dataset(data.train, data.image_size, eval_tf) if train_tf is not None else train
    train_part, val_part = holdout_split(train, data.val_fraction, seed)
    return train_part, torch.utils.data.Subset(plain, val_part.indices)


def build_optimizer(optim: OptimConfig, model: nn.Module, include=None) -> torch.optim.Optimizer:
    """``optim.name`` over the model's parameter groups (SS2D's ``_no_weight_decay`` ones without
    decay); ``include(name, param)``, when given, picks the parameters (a per-task optimiser).
    ``optim.fused`` picks torch's fused update (None: Adam / AdamW where every parameter allows
    it; SGD only when true)."""
    from lesionkit.engine.param_groups import parameter_groups

    params = parameter_groups(model, optim.weight_decay, include, optim.lr)
    fused = fused_update(optim.fused, [p for g in params for p in g["params"]])
    if optim.name == "sgd":
        # Only on request: torch's fused SGD fails when a parameter gets its first gradient after
        # others already have momentum buffers (SegMAE's per-task optimisers).
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                               nesterov=optim.nesterov, fused=fused if optim.fused else None)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                                fused=fused)
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             fused=fused)


FUSED_DEVICES = ("cpu", "cuda")


def fused_update(requested: bool | None, params: list[torch.Tensor]) -> bool | None:
    """Whether the optimiser takes torch's fused path: ``requested`` True / False as given (True
    with a parameter torch cannot fuse is an error naming it), None = True when every parameter is
    a floating-point tensor on the CPU or a CUDA device, else torch's default."""
    unfit = [p for p in params if p.device.type not in FUSED_DEVICES or not p.is_floating_point()]
    if requested is None:
        return True if params and not unfit else None
    if requested and unfit:
        p = unfit[0]
        raise ValueError(f"optim.fused is true but a parameter is {p.dtype} on {p.device}; the fused update "
                         f"needs floating-point parameters on {' or '.join(FUSED_DEVICES)} (set optim.fused: null)")
    return requested
