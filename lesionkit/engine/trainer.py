"""The training loop shared by every method.

Methods plug in by subclassing :class:`Trainer` and overriding hooks, never by copying the loop:

- ``build_model`` / ``build_loss`` / ``build_datasets`` / ``configure_optimizers``
- ``stages()`` for multi-stage schedules (e.g. SegMAE: MAE pre-training, then segmentation);
  ``on_stage_start(stage)`` may freeze modules or rebuild the optimiser
- ``training_step(batch) -> {"loss": total, **parts}`` for extra losses (CM-SSM distillation)
  or alternating objectives (``self.global_step % 2``); ``optimization_step`` for full control
  of backward / step
- ``augment(batch)``, ``on_epoch_start`` / ``on_epoch_end``, ``on_train_end``

Register a subclass with ``@register_trainer("name")`` and select it with ``trainer: name``.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from lesionkit.engine.builders import build_dataset, build_eval_transform, build_loss, build_train_transform
from lesionkit.engine.checkpoint import capture_rng_state, checkpoint_header, load_checkpoint, restore_rng_state, save_checkpoint
from lesionkit.engine.config import TrainConfig
from lesionkit.engine.distributed import DistributedContext
from lesionkit.engine.evaluation import autocast_context, evaluate
from lesionkit.engine.param_groups import parameter_groups
from lesionkit.engine.schedulers import build_scheduler, steps_per_batch
from lesionkit.models import create_model, segmentation_logits

TRAINERS: dict[str, type["Trainer"]] = {}


def register_trainer(name: str) -> Callable[[type["Trainer"]], type["Trainer"]]:
    def wrap(cls: type["Trainer"]) -> type["Trainer"]:
        if name in TRAINERS:
            raise ValueError(f"trainer {name!r} is registered twice")
        TRAINERS[name] = cls
        return cls

    return wrap


def get_trainer_class(name: str) -> type["Trainer"]:
    """The trainer registered as ``name``; a recipe in ``lesionkit/engine/<name>_trainer.py`` is
    imported on first use, so recipes need no eager import here."""
    if name not in TRAINERS:
        module = f"lesionkit.engine.{name}_trainer"
        if name.isidentifier() and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; registered trainers: {sorted(TRAINERS)}")
    return TRAINERS[name]


def load_train_config(source: str | Path | dict) -> TrainConfig:
    """A config (YAML file or dict) as the dataclass of the trainer its ``trainer:`` key names."""
    if isinstance(source, dict):
        data, where = source, None
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        data, where = yaml.safe_load(path.read_text()) or {}, path
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} should hold a mapping, got {type(data).__name__}")
    name = data.get("trainer", TrainConfig.trainer)
    try:
        return get_trainer_class(name).config_class.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}" if where else str(err)) from None


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive numpy/random from it too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def default_num_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # On 2 cores a worker process steals the compute the model needs; above that, overlap decoding.
    return 0 if cpus <= 2 else min(8, cpus - 1)


def holdout_split(dataset: torch.utils.data.Dataset, fraction: float, seed: int):
    """Seeded (train, val) subsets with ``round(fraction * n)`` (at least 1) images held out."""
    n = len(dataset)
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise ValueError(f"cannot hold out {fraction:.0%} of {n} images for validation and keep any for training")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.utils.data.Subset(dataset, sorted(perm[n_val:])), torch.utils.data.Subset(dataset, sorted(perm[:n_val]))


def _plain(value: Any) -> Any:
    """Numbers and containers as Python primitives (``weights_only``-safe)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _flatten_metrics(metrics: dict) -> dict[str, float]:
    """``{"dice": .., "per_image_dice": .., "isic_jaccard": ..}`` for logs."""
    out: dict[str, float] = {}
    for key, value in metrics.get("dataset", {}).items():
        out[key] = float(value)
    for key, value in metrics.get("per_image", {}).items():
        out[f"per_image_{key}"] = float(value)
    if "isic_jaccard" in metrics:
        out["isic_jaccard"] = float(metrics["isic_jaccard"])
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
        raise ValueError(f"monitor {monitor!r} is not among the validation metrics {sorted(_flatten_metrics(metrics))}")
    return float(source[key])


@register_trainer("segmentation")
class Trainer:
    """Supervised segmentation training driven by a :class:`TrainConfig`."""

    config_class = TrainConfig
    # Recipes whose steps leave part of the model unused (SegMAE's alternating segmentation and
    # reconstruction steps) set this so DistributedDataParallel does not wait for those grads.
    ddp_find_unused_parameters = False

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None,
                 train_data: torch.utils.data.Dataset | None = None, val_data: torch.utils.data.Dataset | None = None,
                 loss_fn: nn.Module | None = None) -> None:
        self.cfg = config
        device = resolve_device(config.device)
        self.dist = DistributedContext.from_env(config.dist_timeout, device.type)
        self.device = resolve_device(config.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device, got {self.device}; use 'bf16' or 'fp32' on CPU")
        self.out_dir = Path(config.out_dir)
        self._set_determinism()

        seed_everything(config.seed)  # same on every rank: identical initial weights
        self.model = (model if model is not None else self.build_model()).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = loss_fn if loss_fn is not None else self.build_loss()
        if train_data is None:
            train_data, val_data = self.build_datasets()
        self.train_data, self.val_data = train_data, val_data
        seed_everything(config.seed + self.dist.rank)  # augmentation differs between ranks

        self.train_loader = self.build_train_loader()
        self.val_loader = self.build_val_loader()
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training data has {len(self.train_data)} images, fewer than one batch of {config.data.batch_size}")
        stages = self.stages()
        if not stages or any(s.epochs < 0 for s in stages):
            raise ValueError(f"stages() should list stages with epochs >= 0, got {stages}")
        self.stage: Stage = stages[0]
        self.optimizer, self.scheduler = self.configure_optimizers()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            if config.sync_batchnorm:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=self.ddp_find_unused_parameters)

        self.epoch = 0  # completed epochs, over all stages
        self.global_step = 0
        self.best_metric = -math.inf
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.elapsed_before = 0.0  # seconds spent before a resume
        self.last_metrics: dict | None = None
        self._resume_state: dict | None = None
        self._fit_start = 0.0
        self._train_seconds = 0.0
        self._train_images = 0
        self._tb = None

    def _set_determinism(self) -> None:
        if self.cfg.deterministic:
            # cuBLAS needs a fixed workspace for reproducible GEMMs (CUDA docs, "Reproducibility").
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # ----------------------------------------------------------------------------- builders

    def build_model(self) -> nn.Module:
        return create_model(self.cfg.model.name, **self.cfg.model.kwargs)

    def build_loss(self) -> nn.Module:
        return build_loss(self.cfg.loss)

    def build_datasets(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
        data = self.cfg.data
        if not data.train:
            raise ValueError("data.train is not set: give a data spec such as 'synthetic:200' or 'isic:PATH:train'")
        train_tf, eval_tf = build_train_transform(data), build_eval_transform(data)
        train = build_dataset(data.train, data.image_size, train_tf)
        if data.val:
            return train, build_dataset(data.val, data.image_size, eval_tf)
        if data.val_fraction == 0:
            return train, None
        # The held-out part must not see the training augmentation: same indices, own dataset.
        plain = build_dataset(data.train, data.image_size, eval_tf) if train_tf is not None else train
        train_part, val_part = holdout_split(train, data.val_fraction, self.cfg.seed)
        return train_part, torch.utils.data.Subset(plain, val_part.indices)

    def _num_workers(self) -> int:
        return default_num_workers() if self.cfg.data.num_workers < 0 else self.cfg.data.num_workers

    def build_train_loader(self) -> torch.utils.data.DataLoader:
        data = self.train_data
        # Per-epoch generators (reseeded in train_epoch) make the order independent of the
        # global RNG, so a resumed run sees the same batches as an uninterrupted one.
        self._order_generator = torch.Generator()
        self._loader_generator = torch.Generator()
        if self.dist.enabled:
            sampler = torch.utils.data.DistributedSampler(data, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                                          shuffle=True, seed=self.cfg.seed)
        else:
            sampler = torch.utils.data.RandomSampler(data, generator=self._order_generator)
        per_rank = math.ceil(len(data) / self.dist.world_size)
        bs = self.cfg.data.batch_size
        return torch.utils.data.DataLoader(
            data, batch_size=bs, sampler=sampler, num_workers=self._num_workers(),
            pin_memory=self.device.type == "cuda", drop_last=per_rank >= 2 * bs,
            generator=self._loader_generator, worker_init_fn=_seed_worker)

    def build_val_loader(self) -> torch.utils.data.DataLoader | None:
        if self.val_data is None:
            return None
        bs = self.cfg.data.val_batch_size or 2 * self.cfg.data.batch_size
        return torch.utils.data.DataLoader(self.val_data, batch_size=bs, shuffle=False, num_workers=self._num_workers(),
                                           pin_memory=self.device.type == "cuda")

    def configure_optimizers(self):
        """``(optimizer, scheduler or None)`` for the current stage."""
        o = self.cfg.optim
        # Parameters marked _no_weight_decay (SS2D's A_logs, Ds) get a group without decay.
        params = parameter_groups(self.model, o.weight_decay)
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
        elif o.name == "adam":
            opt = torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        return opt, build_scheduler(self.cfg.scheduler, opt, self.stage.epochs, self.steps_per_epoch)

    # ----------------------------------------------------------------------------- hooks

    def stages(self) -> list[Stage]:
        return [Stage("train", self.cfg.epochs)]

    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages())

    def on_stage_start(self, stage: Stage) -> None:
        """Called when a stage begins (and when a run resumes inside it, before state loads)."""

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        pass

    def on_train_end(self, summary: dict) -> None:
        pass

    def forward(self, images: torch.Tensor, **kwargs):
        """The (DDP-wrapped, when distributed) model's forward; use it inside ``training_step``."""
        return self.train_model(images, **kwargs)

    def augment(self, batch: dict) -> dict:
        """Random flips / 90-degree turns per sample, on the batch's device."""
        aug = self.cfg.data.augment
        image, mask = batch["image"], batch["mask"]
        n = image.shape[0]
        for name, dims in (("hflip", (-1,)), ("vflip", (-2,))):
            if name in aug:
                m = (torch.rand(n) < 0.5).to(image.device).view(n, 1, 1, 1)
                image, mask = torch.where(m, image.flip(dims), image), torch.where(m, mask.flip(dims), mask)
        if "rot90" in aug and image.shape[-1] == image.shape[-2]:
            m = (torch.rand(n) < 0.5).to(image.device).view(n, 1, 1, 1)
            image = torch.where(m, image.transpose(-1, -2), image)
            mask = torch.where(m, mask.transpose(-1, -2), mask)
        return {**batch, "image": image, "mask": mask}

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Losses for one batch; ``"loss"`` is what is back-propagated, other keys are logged."""
        logits = segmentation_logits(self.forward(batch["image"]))
        return {"loss": self.loss_fn(logits.float(), batch["mask"])}

    def optimization_step(self, batch: dict) -> dict[str, torch.Tensor]:
        with autocast_context(self.device, self.cfg.precision):
            losses = self.training_step(batch)
        if "loss" not in losses:
            raise KeyError(f"training_step must return a 'loss' entry, got {sorted(losses)}")
        loss = losses["loss"]
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(f"training loss is {loss.item()} at epoch {self.epoch + 1}, step {self.global_step}; "
                                     f"lower optim.lr (now {self.cfg.optim.lr}) or set grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if steps_per_batch(self.scheduler):
            if self.cfg.scheduler.horizon == "time_budget" and hasattr(self.scheduler, "time_progress"):
                self.scheduler.time_progress = self.elapsed() / self.cfg.time_budget
            self.scheduler.step()
        return {k: v.detach() for k, v in losses.items()}

    # ----------------------------------------------------------------------------- loop

    def fit(self) -> dict:
        """Train all stages (or until the time budget / early stopping); returns a summary."""
        cfg = self.cfg
        self._fit_start = time.monotonic()
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.out_dir / "config.yaml")
            self._prepare_log()
            if cfg.tensorboard:
                self._tb = _tensorboard_writer(self.out_dir / "tensorboard")
        stages = self.stages()
        total = sum(s.epochs for s in stages)
        stop_reason = "epochs"
        current = None
        while self.epoch < total:
            index, stage = self._stage_at(stages, self.epoch)
            if index != current:
                current, self.stage = index, stage
                self.on_stage_start(stage)
                if self._resume_state is not None:
                    self._apply_state(self._resume_state)
                    self._resume_state = None
            self.on_epoch_start(self.epoch)
            train_logs, budget_hit = self.train_epoch(total)
            self.sync_buffers()
            self.epoch += 1
            logs = {"epoch": self.epoch, "stage": stage.name, "step": self.global_step,
                    "lr": self.optimizer.param_groups[0]["lr"], **{f"train_{k}": v for k, v in train_logs.items()}}
            value = self._validate_and_share()
            if value is not None:
                flat = _flatten_metrics(self.last_metrics or {})
                logs.update({f"val_{k}": v for k, v in flat.items() if self.cfg.val_hd95 or "hd95" not in k})
                improved = value > self.best_metric
                if improved:
                    self.best_metric, self.best_epoch, self.bad_epochs = value, self.epoch, 0
                else:
                    self.bad_epochs += 1
                if self.scheduler is not None and not steps_per_batch(self.scheduler):
                    self.scheduler.step(value)
            else:
                improved = True  # no validation data: the latest model is the best we know
                self.best_epoch = self.epoch
            logs["time"] = self.elapsed()
            self.on_epoch_end(self.epoch, logs)
            self.save(self.out_dir / "last.pt")
            if improved:
                self.save(self.out_dir / "best.pt", full=False)
            if self.dist.is_main:
                self._log(logs)
            if budget_hit:
                stop_reason = "time_budget"
                break
            if cfg.early_stopping_patience is not None and self.bad_epochs >= cfg.early_stopping_patience:
                stop_reason = "early_stopping"
                break
        summary = {
            "epochs": self.epoch, "global_step": self.global_step, "stop_reason": stop_reason,
            "best_metric": self.best_metric if math.isfinite(self.best_metric) else None, "best_epoch": self.best_epoch,
            "monitor": cfg.monitor, "elapsed_s": self.elapsed(), "last_metrics": self.last_metrics,
            "train_images_per_s": self._train_images / self._train_seconds if self._train_seconds > 0 else None,
        }
        if self._tb is not None:
            self._tb.close()
        self.on_train_end(summary)
        return summary

    def train_epoch(self, total_epochs: int) -> tuple[dict[str, float], bool]:
        from tqdm import tqdm

        self.train_model.train()
        epoch_seed = self.cfg.seed * 100_003 + self.epoch
        self._order_generator.manual_seed(epoch_seed)
        self._loader_generator.manual_seed(epoch_seed + 1)
        sampler = self.train_loader.sampler
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(self.epoch)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        budget_hit = False
        start = time.monotonic()
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{total_epochs} [{self.stage.name}]",
                   disable=not (self.cfg.progress and self.dist.is_main), leave=False, mininterval=1.0)
        for batch in bar:
            batch = self.augment(self.to_device(batch))
            losses = self.optimization_step(batch)
            self.global_step += 1
            count += 1
            self._train_images += batch["image"].shape[0]
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.float()
            if count % 10 == 0 and bar.disable is False:
                bar.set_postfix(loss=f"{(sums['loss'] / count).item():.4f}")
            if self._budget_exhausted():
                budget_hit = True
                break
        self._train_seconds += time.monotonic() - start
        bar.close()
        means = {k: (v / max(1, count)).item() for k, v in sums.items()}
        if self.dist.enabled:  # average the logged losses over ranks
            vals = torch.tensor(list(means.values()), dtype=torch.float64)
            torch.distributed.all_reduce(vals)
            means = dict(zip(means, (vals / self.dist.world_size).tolist()))
        return means, budget_hit

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank.

        DDP broadcasts them before each forward, so after the last step of an epoch each rank
        still holds its own; copying rank 0's keeps every rank equal to the checkpoint.
        """
        if self.dist.enabled:
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    def to_device(self, batch: dict) -> dict:
        out = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if self.cfg.channels_last and out["image"].ndim == 4:
            out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
        return out

    def validate(self) -> dict | None:
        """``SegmentationMetrics.compute()`` on the validation data (rank 0 only), or ``None``."""
        if self.val_loader is None or not self.dist.is_main:
            return None
        result = evaluate(self.model, self.val_loader, self.device, self.cfg.threshold, self.cfg.precision,
                          progress=self.cfg.progress, desc="validate", hd95=self.cfg.val_hd95)
        return result.metrics

    def _validate_and_share(self) -> float | None:
        if self.val_loader is None:
            return None
        metrics = self.validate()
        value = math.nan
        if metrics is not None:
            self.last_metrics = _plain(metrics)
            value = monitor_value(metrics, self.cfg.monitor)
        # Every rank takes the same early-stopping and plateau decisions as rank 0.
        (value,) = self.dist.broadcast_floats([value], self.device)
        return value

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._fit_start)

    def _budget_exhausted(self) -> bool:
        if self.cfg.time_budget is None:
            return False
        hit = float(self.elapsed() >= self.cfg.time_budget)
        return self.dist.all_reduce_max(hit, self.device) > 0  # all ranks stop at the same step

    @staticmethod
    def _stage_at(stages: list[Stage], epoch: int) -> tuple[int, Stage]:
        start = 0
        for i, stage in enumerate(stages):
            if epoch < start + stage.epochs:
                return i, stage
            start += stage.epochs
        return len(stages) - 1, stages[-1]

    # ----------------------------------------------------------------------------- state

    def state_dict(self, full: bool = True) -> dict[str, Any]:
        """Checkpoint content; collective when distributed (every rank must call it)."""
        rng = self.dist.gather_objects(capture_rng_state()) if full else None
        state = checkpoint_header(self.cfg.model.name, self.cfg.model.kwargs, self.cfg.to_dict())
        state.update({
            "model": self.model.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "stage": self.stage.name,
            "metrics": self.last_metrics,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
        })
        if full:
            state.update({
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "bad_epochs": self.bad_epochs,
                "elapsed": self.elapsed(),
                "world_size": self.dist.world_size,
            })
        return state

    def save(self, path: str | Path, full: bool = True) -> None:
        state = self.state_dict(full)
        if self.dist.is_main:
            save_checkpoint(state, path)

    def resume(self, path: str | Path) -> None:
        """Continue from a ``last.pt``; the state loads when :meth:`fit` enters its stage."""
        state = load_checkpoint(path, map_location=self.device)
        if "optimizer" not in state:
            raise ValueError(f"checkpoint {str(path)!r} holds weights only (a best.pt?); resume from last.pt")
        if state["model_name"] != self.cfg.model.name:
            raise ValueError(f"checkpoint {str(path)!r} holds model {state['model_name']!r}, but this run trains {self.cfg.model.name!r}")
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = int(state["bad_epochs"])
        self.elapsed_before = float(state["elapsed"])
        self.last_metrics = state.get("metrics")
        self._resume_state = state

    def _apply_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            horizon = getattr(self.scheduler, "total_steps", None)
            self.scheduler.load_state_dict(state["scheduler"])
            if horizon is not None:  # a resume with more epochs stretches the schedule to them
                self.scheduler.total_steps = horizon
        self.scaler.load_state_dict(state["scaler"])
        rng = state.get("rng")
        if rng and len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        else:
            warnings.warn(f"checkpoint was written by {len(rng or [])} process(es), this run has {self.dist.world_size}: "
                          "random streams restart from the seed, so the run will not match an uninterrupted one", stacklevel=2)
            seed_everything(self.cfg.seed + self.dist.rank + self.epoch)

    # ----------------------------------------------------------------------------- logging

    def _prepare_log(self) -> None:
        path = self.out_dir / "log.csv"
        if self._resume_state is None or not path.exists():
            path.unlink(missing_ok=True)
            return
        # Drop rows written after the checkpoint we resume from (a kill between log and save).
        rows = self.read_log()
        self._write_rows([r for r in rows if int(r["epoch"]) <= self.epoch])

    def read_log(self) -> list[dict]:
        path = self.out_dir / "log.csv"
        if not path.exists():
            return []
        with path.open(newline="") as f:
            return list(csv.DictReader(f))

    def _write_rows(self, rows: list[dict]) -> None:
        path = self.out_dir / "log.csv"
        fields: list[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

    def _log(self, logs: dict[str, Any]) -> None:
        from lesionkit.engine.curves import plot_curves

        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in logs.items()}
        rows = self.read_log() + [row]
        self._write_rows(rows)
        plot_curves(rows, self.out_dir / "curves.png")
        if self._tb is not None:
            for k, v in logs.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._tb.add_scalar(k, v, self.epoch)
        if not self.cfg.progress:
            return
        shown = " ".join(f"{k}={row[k]}" for k in ("epoch", "train_loss", "val_dice", "time") if k in row)
        print(shown, flush=True)


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(f"tensorboard: true needs the tensorboard package ({err}); install lesionkit[tensorboard]") from err
    return SummaryWriter(str(path))


def build_trainer(config: TrainConfig, **kwargs) -> Trainer:
    """The trainer class named by ``config.trainer``, constructed on ``config``."""
    return get_trainer_class(config.trainer)(config, **kwargs)
