"""Training configuration: dataclasses that load from and save to YAML.

``TrainConfig.from_dict`` rejects unknown keys and wrong types with the dotted key name, so a
typo in a YAML file or a ``--set`` override fails loudly instead of being ignored. Method
recipes subclass :class:`TrainConfig` to add their own fields. Which subclass a YAML file
needs is the trainer's business: :func:`lesionkit.engine.registry.load_train_config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


@dataclass
class ModelConfig:
    name: str = "unet_tiny"
    kwargs: dict[str, Any] = field(default_factory=dict)  # fields of the model's config dataclass


@dataclass
class DataConfig:
    train: str | None = None  # a lesionkit.data.from_spec string
    val: str | None = None  # None: hold out `val_fraction` of `train` (seeded)
    image_size: int = 128
    batch_size: int = 16
    val_batch_size: int | None = None  # None: 2 x batch_size
    val_fraction: float = 0.1
    num_workers: int = -1  # -1: chosen from the CPU count
    # Training augmentation (lesionkit.data.transforms): hflip, vflip, rot90 (probabilities, per
    # sample, applied to each batch on the device; default 0.5, 0.5, 0), rotation (degrees),
    # brightness, contrast, gray_world (per image in the loader; gray_world also at evaluation).
    transforms: dict[str, Any] = field(default_factory=dict)
    # Older spelling of the flips: a list of hflip / vflip / rot90, read as
    # transforms {name: 0.5 if listed else 0}. Folded into `transforms` on load.
    augment: list[str] | None = None
    # Train on a seeded fraction of the labelled training images (after the validation hold-out):
    # lesionkit.data.labelled_fraction, seed `label_seed` (None: the run's seed). The subset is
    # recorded in the checkpoints and restored on resume.
    label_fraction: float = 1.0
    label_seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"data.label_fraction should be in (0, 1], got {self.label_fraction}")
        if self.augment is not None:
            unknown = sorted(set(self.augment) - {"hflip", "vflip", "rot90"})
            if unknown:
                raise ValueError(f"data.augment has unknown entries {unknown}; valid: ['hflip', 'vflip', 'rot90']")
            self.transforms = {**self.transforms, **{k: 0.5 if k in self.augment else 0.0 for k in ("hflip", "vflip", "rot90")}}
            self.augment = None
        from lesionkit.data.transforms import split_transform_options

        split_transform_options(self.transforms)  # unknown keys and bad probabilities fail at load


@dataclass
class OptimConfig:
    name: str = "adamw"  # sgd | adam | adamw
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam / adamw
    # torch's fused (one kernel over all parameters) update: None = Adam / AdamW take it where
    # torch has it (every parameter a floating-point tensor on the CPU or a CUDA device; 2.4-4x
    # faster than the per-parameter loop on a CPU, the same update up to rounding), SGD does not;
    # true = required, false = never.
    fused: bool | None = None


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # none | cosine | poly | plateau
    warmup_epochs: float = 0.0  # linear warm-up (cosine / poly)
    # The warm-up's first rate as a fraction of the base lr: 0 = from min_lr (ours), 0.1 = GRCSF's
    # "increases the learning rate tenfold" (Sec. 4).
    warmup_start: float = 0.0
    # horizon "time_budget" only: the warm-up ends once this fraction of the budget is spent, even
    # if warmup_epochs is not reached (a slow model in a short budget would otherwise spend its
    # run warming up); the cosine / poly decay then covers the rest of the budget.
    warmup_max_fraction: float = 0.05
    min_lr: float = 0.0
    power: float = 0.9  # poly
    factor: float = 0.5  # plateau: lr *= factor after `patience` epochs without improvement
    patience: int = 5  # plateau
    # What cosine / poly decay over: "epochs" (steps of all epochs; exactly reproducible) or
    # "time_budget" (the fraction of time_budget used, so a run cut by its budget still ends
    # at min_lr on any machine; not bit-reproducible).
    horizon: str = "epochs"
    # Cosine only: the half-period in epochs, as torch's CosineAnnealingLR(T_max) stepped once an
    # epoch - the lr falls to min_lr over t_max_epochs, rises back over the next t_max_epochs, and
    # so on (VM-UNet / CM-SSM: 50 over 300 epochs). None: one decay over the whole run.
    t_max_epochs: float | None = None


@dataclass
class LossConfig:
    name: str = "bce_dice"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    # last.pt is written at the end of every epoch and, with these, also inside an epoch: after
    # every `every_steps` optimiser steps and/or once `every_minutes` have passed since the last
    # write. `--resume` from such a checkpoint continues at the next batch.
    every_steps: int | None = None
    every_minutes: float | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    trainer: str = "segmentation"  # a name in lesionkit.engine.registry.TRAINER_MODULES (resolved there)
    epochs: int = 50
    time_budget: float | None = None  # seconds of training; stops after the step that crosses it
    # fp32 | bf16 | fp16 (fp16 on GPU only) | auto (bf16 where the device runs it natively: a GPU
    # with bf16, a CPU with AVX-512 BF16 or AMX; fp32 elsewhere, where CPU bf16 is emulated and
    # several times slower than fp32)
    precision: str = "fp32"
    grad_clip: float | None = None  # max global gradient norm
    channels_last: bool = False  # NHWC memory format: faster convolutions on CPU (oneDNN) and tensor cores
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    val_hd95: bool = False  # HD95 in per-epoch validation (costs two distance transforms per image)
    # Validation metric that picks best.pt and drives early stopping: "dice" (dataset-level),
    # "per_image.dice", ... (higher is better) or "loss", the training loss on the validation
    # data (lower is better; GRCSF's early stopping, Sec. 4).
    monitor: str = "dice"
    early_stopping_patience: int | None = None  # epochs without improvement
    threshold: float = 0.5
    out_dir: str = "runs/train"
    # A progress bar per epoch on a terminal, one line per epoch when output goes to a file;
    # false: neither.
    progress: bool = True
    tensorboard: bool = False
    sync_batchnorm: bool = False  # distributed: BatchNorm statistics over all ranks' batches
    dist_timeout: float = 300.0  # seconds a collective waits for a peer before failing
    # Start from the weights of another checkpoint (e.g. `lesionkit pretrain`'s best.pt): the
    # tensors of `init_parts` whose names and shapes match (lesionkit.engine.init_weights).
    init_from: str | None = None
    init_parts: str = "encoder"  # encoder | encoder+decoder | all (every matching tensor)

    def __post_init__(self) -> None:
        choices = {
            "precision": (self.precision, ("fp32", "bf16", "fp16", "auto")),
            "optim.name": (self.optim.name, ("sgd", "adam", "adamw")),
            "scheduler.name": (self.scheduler.name, ("none", "cosine", "poly", "plateau")),
            "scheduler.horizon": (self.scheduler.horizon, ("epochs", "time_budget")),
            "init_parts": (self.init_parts, ("encoder", "encoder+decoder", "all")),
        }
        for key, (value, valid) in choices.items():
            if value not in valid:
                raise ValueError(f"{key} should be one of {list(valid)}, got {value!r}")
        positive = {"epochs": self.epochs, "data.batch_size": self.data.batch_size, "data.image_size": self.data.image_size}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} should be >= 1, got {value}")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction should be in [0, 1), got {self.data.val_fraction}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget should be > 0 seconds, got {self.time_budget}")
        if self.checkpoint.every_steps is not None and self.checkpoint.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps should be >= 1 or null, got {self.checkpoint.every_steps}")
        if self.checkpoint.every_minutes is not None and not self.checkpoint.every_minutes > 0:
            raise ValueError(f"checkpoint.every_minutes should be > 0 or null, got {self.checkpoint.every_minutes}")
        if self.scheduler.horizon == "time_budget" and self.time_budget is None:
            raise ValueError("scheduler.horizon 'time_budget' needs time_budget to be set")

    # --- conversion -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of primitives (YAML- and ``torch.load(weights_only=True)``-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return _from_dict(cls, data, prefix="")

    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        path = Path(path)
        try:
            return cls.from_dict(read_yaml_mapping(path))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_overrides(self: T, overrides: list[str]) -> T:
        """A copy with ``key.sub=value`` overrides applied; values are parsed as YAML."""
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--set expects key=value, got {item!r}")
            parts = key.strip().split(".")
            node, tp = data, type(self)
            for i, part in enumerate(parts):
                dotted = ".".join(parts[: i + 1])
                next_tp = None
                if tp is not None:  # inside a dataclass: the key must be one of its fields
                    hints = typing.get_type_hints(tp)
                    if part not in hints:
                        raise ValueError(f"--set {item!r}: unknown config key {dotted!r}; valid keys here: {sorted(hints)}")
                    next_tp = hints[part] if dataclasses.is_dataclass(hints[part]) else None
                if i == len(parts) - 1:
                    node[part] = yaml.safe_load(raw)
                else:
                    child = node.setdefault(part, {})
                    if not isinstance(child, dict):
                        raise ValueError(f"--set {item!r}: {dotted!r} is not a mapping (it holds {child!r})")
                    node, tp = child, next_tp
        return type(self).from_dict(data)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} should hold a mapping, got {type(data).__name__}")
    return data


def _from_dict(cls: type[T], data: Any, prefix: str) -> T:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} should be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        dotted = [f"{prefix}.{k}" if prefix else k for k in unknown]
        raise ValueError(f"unknown config key(s) {dotted}; valid keys{' of ' + repr(prefix) if prefix else ''}: {sorted(names)}")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(hints[name], value, key)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{key} got {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} should be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} should be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} should be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{key} should be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} should be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} should be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has unsupported type {tp}")
