"""The training loop shared by every method: the :class:`Trainer` and its hooks.

Methods plug in by subclassing :class:`Trainer` and overriding hooks, never by copying the loop:

- ``build_model`` / ``build_loss`` / ``build_datasets`` / ``configure_optimizers``
- ``stages()`` for multi-stage schedules (SegMAE: MAE pre-training, then segmentation; AMLP:
  pre-training, then fine-tuning). ``on_stage_start(stage)`` may freeze modules or swap heads;
  ``optimizer_per_stage = True`` rebuilds the optimiser and schedule for each stage (after the
  hook) and makes a resume at a stage boundary start the stage with them, as an uninterrupted
  run does
- ``training_step(batch) -> {"loss": total, **parts}`` for extra losses (CM-SSM distillation);
  ``optimization_step(batch)`` for several updates per batch, each through
  ``optimize(step_fn, batch)`` (SegMAE: a segmentation step, then a reconstruction step)
- ``augment(batch)``, ``on_epoch_start`` / ``on_epoch_end``, ``on_train_end``,
  ``load_resume_state(state)``

Register a subclass with ``@register_trainer("name")``, add its module to
:data:`lesionkit.engine.registry.TRAINER_MODULES` and select it with ``trainer: name``.
Where the rest lives: config loading in :mod:`~lesionkit.engine.config`, seeding, devices and
stop signals in :mod:`~lesionkit.engine.runtime`, the log files in :mod:`~lesionkit.engine.run_log`,
checkpoint files in :mod:`~lesionkit.engine.checkpoint`, validation in
:mod:`~lesionkit.engine.evaluation`; data splits, augmentation and checks in :mod:`lesionkit.data`.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lesionkit.data.check import check_files
from lesionkit.data.splits import holdout_split
from lesionkit.data.transforms import BatchFlips, split_transform_options
from lesionkit.engine.builders import build_dataset, build_eval_transform, build_loss, build_train_transform
from lesionkit.engine.checkpoint import capture_rng_state, checkpoint_header, load_checkpoint, restore_rng_state, save_checkpoint
from lesionkit.engine.config import TrainConfig, load_train_config
from lesionkit.engine.distributed import DistributedContext
from lesionkit.engine.evaluation import autocast_context, evaluate, flatten_metrics, monitor_value, plain_metrics
from lesionkit.engine.param_groups import parameter_groups
from lesionkit.engine.registry import TRAINERS, get_trainer_class, register_trainer
from lesionkit.engine.run_log import RunLog
from lesionkit.engine.runtime import (
    StopRequests,
    default_num_workers,
    init_worker,
    on_terminal,
    resolve_device,
    seed_everything,
    set_determinism,
)
from lesionkit.engine.schedulers import build_scheduler, steps_per_batch
from lesionkit.models import create_model, segmentation_logits


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int


class SkipSampler(torch.utils.data.Sampler):
    """A sampler's order without its first ``skip`` indices: a resumed epoch starts at the batch it stopped at."""

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


@register_trainer("segmentation")
class Trainer:
    """Supervised segmentation training driven by a :class:`TrainConfig`."""

    config_class = TrainConfig
    # Recipes whose steps leave part of the model unused (SegMAE's alternating segmentation and
    # reconstruction steps) set this so DistributedDataParallel does not wait for those grads.
    ddp_find_unused_parameters = False
    # Recipes whose stages train different parameters or objectives (pre-training -> fine-tuning)
    # set this: each stage starts with a fresh optimiser and schedule from configure_optimizers,
    # built after on_stage_start, and a resume at a stage boundary does the same.
    optimizer_per_stage = False
    # Batch keys validation passes to the model besides the image (GRCSF: "residual_maps").
    model_inputs: tuple[str, ...] = ()
    # Self-supervised pre-training recipes (run by ``lesionkit pretrain``) set this to what to do
    # with the result, a hint formatted with ``out`` = the run's folder; None: a training recipe.
    pretraining: str | None = None

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None,
                 train_data: torch.utils.data.Dataset | None = None, val_data: torch.utils.data.Dataset | None = None,
                 loss_fn: nn.Module | None = None) -> None:
        recipe = type(self).config_class
        if not isinstance(config, recipe):
            raise ValueError(f"trainer {recipe.trainer!r} needs a {recipe.__name__} (a config with trainer: "
                             f"{recipe.trainer}), got {type(config).__name__}")
        self.cfg = config
        device = resolve_device(config.device)
        self.dist = DistributedContext.from_env(config.dist_timeout, device.type)
        self.device = resolve_device(config.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device, got {self.device}; use 'bf16' or 'fp32' on CPU")
        self.out_dir = Path(config.out_dir)
        set_determinism(config.deterministic, self.device)

        seed_everything(config.seed)  # same on every rank: identical initial weights
        self.model = model if model is not None else self.build_model()
        self.init_report = self.load_init_weights() if config.init_from else None
        self.model = self.model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = loss_fn if loss_fn is not None else self.build_loss()
        if train_data is None:
            train_data, val_data = self.build_datasets()
        self.full_train_data = train_data
        self.label_subset = self.select_labelled(train_data)
        if self.label_subset is not None:
            train_data = torch.utils.data.Subset(train_data, self.label_subset["indices"])
        self.train_data, self.val_data = train_data, val_data
        self.batch_flips = BatchFlips(**split_transform_options(config.data.transforms)[0])
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
        self.stage_start_epoch = 0  # the epoch (over all stages) at which the current stage began
        self._resume_state: dict | None = None
        self._fit_start = 0.0
        self._train_seconds = 0.0
        self._train_images = 0
        # A partly trained epoch (a mid-epoch checkpoint): batches done and their loss sums.
        self._epoch_batches = 0
        self._epoch_sums: dict[str, float] = {}  # from a mid-epoch checkpoint
        self._running_sums: dict[str, torch.Tensor] = {}
        self._last_save = time.monotonic()
        self._stop = StopRequests()
        self.run_log: RunLog | None = None

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
        check_files(train, data.train)
        if data.val:
            val = build_dataset(data.val, data.image_size, eval_tf)
            check_files(val, data.val)
            return train, val
        if data.val_fraction == 0:
            return train, None
        # The held-out part must not see the training augmentation: same indices, own dataset.
        plain = build_dataset(data.train, data.image_size, eval_tf) if train_tf is not None else train
        train_part, val_part = holdout_split(train, data.val_fraction, self.cfg.seed)
        return train_part, torch.utils.data.Subset(plain, val_part.indices)

    def load_init_weights(self):
        """``init_from``: the matching tensors of ``init_parts`` from another checkpoint; reports the keys."""
        from lesionkit.engine.init_weights import load_init_weights

        report = load_init_weights(self.model, self.cfg.init_from, self.cfg.init_parts)
        if self.dist.is_main:
            print(report.summary(), flush=True)
        return report

    def select_labelled(self, train_data: torch.utils.data.Dataset) -> dict | None:
        """``data.label_fraction`` < 1: the seeded labelled subset (indices into ``train_data``), or None."""
        data = self.cfg.data
        if data.label_fraction >= 1.0:
            return None
        from lesionkit.data.splits import labelled_fraction

        seed = self.cfg.seed if data.label_seed is None else data.label_seed
        labelled, _ = labelled_fraction(train_data, data.label_fraction, seed)
        return {"fraction": data.label_fraction, "seed": seed, "of": len(train_data),
                "indices": [int(i) for i in labelled.indices], "ids": _sample_ids(train_data, labelled.indices)}

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
        self._skip_sampler = SkipSampler(sampler)
        per_rank = math.ceil(len(data) / self.dist.world_size)
        bs = self.cfg.data.batch_size
        return torch.utils.data.DataLoader(
            data, batch_size=bs, sampler=self._skip_sampler, num_workers=self._num_workers(),
            pin_memory=self.device.type == "cuda", drop_last=per_rank >= 2 * bs,
            generator=self._loader_generator, worker_init_fn=init_worker)

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
        """Called when a stage begins (and when a run resumes inside it, before its state loads).

        ``self.epoch == self.stage_start_epoch`` tells a fresh start of the stage from a resume
        inside it. With ``optimizer_per_stage`` the optimiser is rebuilt right after this hook.
        """

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
        """Per-batch augmentation on the device: the flips of ``data.transforms`` (:class:`~lesionkit.data.transforms.BatchFlips`)."""
        return self.batch_flips(batch) if self.batch_flips else batch

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Losses for one batch; ``"loss"`` is what is back-propagated, other keys are logged."""
        logits = segmentation_logits(self.forward(batch["image"]))
        return {"loss": self.loss_fn(logits.float(), batch["mask"])}

    def optimization_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Everything one batch trains: by default one update on :meth:`training_step`'s loss.

        Recipes with several updates per batch call :meth:`optimize` once for each, with the
        step function of each objective, and return the merged logs.
        """
        return self.optimize(self.training_step, batch)

    def optimize(self, step_fn: Callable[[dict], dict[str, torch.Tensor]], batch: dict) -> dict[str, torch.Tensor]:
        """One optimiser update on the ``"loss"`` that ``step_fn(batch)`` returns: autocast,
        backward (scaled for fp16), gradient clipping, optimiser and per-step schedule step."""
        with autocast_context(self.device, self.cfg.precision):
            losses = step_fn(batch)
        if "loss" not in losses:
            raise KeyError(f"{getattr(step_fn, '__name__', 'the step function')} must return a 'loss' entry, got {sorted(losses)}")
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
        """Train all stages (or until the time budget, early stopping or a stop signal); returns a summary.

        ``summary["stop_reason"]`` is "epochs", "time_budget", "early_stopping" or, after SIGTERM /
        SIGINT, the signal's name ("SIGTERM"); then ``last.pt`` holds the state to resume from.
        """
        cfg = self.cfg
        self._fit_start = self._last_save = time.monotonic()
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.out_dir / "config.yaml")
            self.run_log = RunLog(self.out_dir, tensorboard=cfg.tensorboard)
            self.run_log.start(self.epoch if self._resume_state is not None else None, self.global_step)
        stages = self.stages()
        total = sum(s.epochs for s in stages)
        stop_reason = "epochs"
        current = None
        with self._stop:
            while self.epoch < total:
                index, stage = self._stage_at(stages, self.epoch)
                if index != current:
                    current, self.stage = index, stage
                    self.stage_start_epoch = sum(s.epochs for s in stages[:index])
                    self.on_stage_start(stage)
                    if self.optimizer_per_stage:
                        self.optimizer, self.scheduler = self.configure_optimizers()
                    if self._resume_state is not None:
                        self.load_resume_state(self._resume_state)
                        self._resume_state = None
                self.on_epoch_start(self.epoch)
                train_logs, stop = self.train_epoch(total)
                if stop not in (None, "time_budget") and self._epoch_batches < self.steps_per_epoch:
                    stop_reason = stop  # a signal inside the epoch: last.pt holds the partly trained epoch
                    break
                self._epoch_batches, self._epoch_sums, self._running_sums = 0, {}, {}
                self.sync_buffers()
                self.epoch += 1
                self._end_epoch(stage, train_logs, total)
                if stop is not None:
                    stop_reason = stop
                    break
                if cfg.early_stopping_patience is not None and self.bad_epochs >= cfg.early_stopping_patience:
                    stop_reason = "early_stopping"
                    break
                if self.dist.any_rank([self._stop.received is not None], self.device)[0]:
                    stop_reason = self._signal_name()  # arrived during validation: last.pt is this epoch's
                    break
        summary = {
            "epochs": self.epoch, "global_step": self.global_step, "stop_reason": stop_reason,
            "best_metric": self.best_metric if math.isfinite(self.best_metric) else None, "best_epoch": self.best_epoch,
            "monitor": cfg.monitor, "elapsed_s": self.elapsed(), "last_metrics": self.last_metrics,
            "train_images_per_s": self._train_images / self._train_seconds if self._train_seconds > 0 else None,
        }
        if self.run_log is not None:
            self.run_log.close()
        self.on_train_end(summary)
        return summary

    def _end_epoch(self, stage: Stage, train_logs: dict[str, float], total: int) -> None:
        """Validate, keep best.pt / last.pt and write the epoch's log row."""
        logs = {"epoch": self.epoch, "stage": stage.name, "step": self.global_step,
                "lr": self.optimizer.param_groups[0]["lr"], **{f"train_{k}": v for k, v in train_logs.items()}}
        value = self._validate_and_share()
        if value is not None:
            flat = flatten_metrics(self.last_metrics or {})
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
        if self.run_log is not None:
            row = self.run_log.append(logs)
            if self.cfg.progress:
                shown = " ".join(f"{k} {row[k]}" for k in ("train_loss", "val_dice") if k in row)
                ips = f"; {self._train_images / self._train_seconds:.1f} images/s" if self._train_seconds > 0 else ""
                print(f"epoch {self.epoch}/{total} [{stage.name}] {shown}; {logs['time']:.1f} s{ips}", flush=True)

    def train_epoch(self, total_epochs: int) -> tuple[dict[str, float], str | None]:
        """One epoch (or its rest, after a mid-epoch resume); returns the mean of each logged loss
        and why it stopped early: ``None``, "time_budget" or a signal's name."""
        from tqdm import tqdm

        self.train_model.train()
        epoch_seed = self.cfg.seed * 100_003 + self.epoch
        self._order_generator.manual_seed(epoch_seed)
        self._loader_generator.manual_seed(epoch_seed + 1)
        sampler = self._skip_sampler.sampler
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(self.epoch)
        # A mid-epoch resume: the same order, without the batches already trained on.
        self._skip_sampler.skip = self._epoch_batches * self.cfg.data.batch_size
        # Loss sums stay on the device (no sync per step); a mid-epoch checkpoint carries them over.
        sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in self._epoch_sums.items()}
        self._running_sums = sums
        count = self._epoch_batches
        stop = None
        start = time.monotonic()
        show_bar = self.cfg.progress and self.dist.is_main and on_terminal()
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{total_epochs} [{self.stage.name}]",
                   total=self.steps_per_epoch, initial=count, disable=not show_bar, leave=False, mininterval=1.0)
        try:
            for batch in bar:
                batch = self.augment(self.to_device(batch))
                losses = self.optimization_step(batch)
                self.global_step += 1
                count += 1
                self._train_images += batch["image"].shape[0]
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.float()
                if count % 10 == 0 and show_bar:
                    bar.set_postfix(loss=f"{(sums['loss'] / count).item():.4f}")
                self._epoch_batches = count
                if self.run_log is not None:
                    self.run_log.add_step(self.global_step, self.epoch + count / self.steps_per_epoch, losses["loss"])
                stop = self._after_step(count)
                if stop is not None:
                    break
        finally:
            self._train_seconds += time.monotonic() - start
            bar.close()
        self._skip_sampler.skip = 0
        means = {k: (v / max(1, count)).item() for k, v in sums.items()}
        if self.dist.enabled:  # average the logged losses over ranks
            vals = torch.tensor(list(means.values()), dtype=torch.float64)
            torch.distributed.all_reduce(vals)
            means = dict(zip(means, (vals / self.dist.world_size).tolist()))
        return means, stop

    def _after_step(self, batches_done: int) -> str | None:
        """Mid-epoch checkpoints and the reasons to stop inside an epoch (agreed by every rank)."""
        ck = self.cfg.checkpoint
        due = (ck.every_steps is not None and self.global_step % ck.every_steps == 0) or (
            ck.every_minutes is not None and time.monotonic() - self._last_save >= 60 * ck.every_minutes)
        budget = self.cfg.time_budget is not None and self.elapsed() >= self.cfg.time_budget
        # One collective for all three keeps every rank at the same step (a no-op on one process).
        due, budget, signalled = self.dist.any_rank([due, budget, self._stop.received is not None], self.device)
        last_batch = batches_done == self.steps_per_epoch
        if (due or signalled) and not last_batch:  # the end of an epoch writes last.pt anyway
            if self.run_log is not None:  # first: a resume drops steps the checkpoint does not hold
                self.run_log.flush()
            self.save(self.out_dir / "last.pt")
        if signalled:
            return self._signal_name()
        return "time_budget" if budget else None

    def _signal_name(self) -> str:
        # A rank that did not receive the signal itself stops because another rank did.
        return signal.Signals(self._stop.received).name if self._stop.received else "SIGTERM"

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
                          progress=self.cfg.progress, desc="validate", hd95=self.cfg.val_hd95,
                          model_inputs=self.model_inputs)
        return result.metrics

    def _validate_and_share(self) -> float | None:
        if self.val_loader is None:
            return None
        metrics = self.validate()
        value = math.nan
        if metrics is not None:
            self.last_metrics = plain_metrics(metrics)
            value = monitor_value(metrics, self.cfg.monitor)
        # Every rank takes the same early-stopping and plateau decisions as rank 0.
        (value,) = self.dist.broadcast_floats([value], self.device)
        return value

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._fit_start)

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
            "label_subset": self.label_subset,
        })
        if full:
            # Inside an epoch: the batches of epoch `epoch + 1` already trained on, and their loss sums.
            sums = {k: float(v) for k, v in self._running_sums.items()} if self._epoch_batches else {}
            state.update({"epoch_batches": self._epoch_batches, "epoch_sums": sums})
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
        if full:
            self._last_save = time.monotonic()

    def resume(self, path: str | Path) -> None:
        """Continue from a ``last.pt`` (written at the end of an epoch or inside one); the state
        loads when :meth:`fit` enters its stage, through :meth:`load_resume_state`."""
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
        self._restore_label_subset(state.get("label_subset"), path)
        self._epoch_batches = int(state.get("epoch_batches", 0))
        self._epoch_sums = {k: float(v) for k, v in (state.get("epoch_sums") or {}).items()}
        if self._epoch_batches >= self.steps_per_epoch:
            raise ValueError(f"checkpoint {str(path)!r} is {self._epoch_batches} batches into an epoch, but an epoch "
                             f"of this run has {self.steps_per_epoch}: resume with the data and batch size it was written with")
        self._resume_state = state

    def _restore_label_subset(self, recorded: dict | None, path) -> None:
        """Train on the labelled subset the checkpoint recorded (``data.label_fraction``)."""
        if recorded is None:
            if self.label_subset is not None:
                raise ValueError(f"checkpoint {str(path)!r} trained on all labelled images, but this run sets "
                                 f"data.label_fraction={self.cfg.data.label_fraction}")
            return
        if recorded["of"] != len(self.full_train_data):
            raise ValueError(f"checkpoint {str(path)!r} drew its labelled subset from {recorded['of']} training images, "
                             f"this run's training data has {len(self.full_train_data)}: resume with the same data")
        if self.label_subset is not None and self.label_subset["indices"] == recorded["indices"]:
            return
        self.label_subset = recorded
        self.train_data = torch.utils.data.Subset(self.full_train_data, recorded["indices"])
        self.train_loader = self.build_train_loader()
        self.steps_per_epoch = len(self.train_loader)

    def load_resume_state(self, state: dict) -> None:
        """Load a resume checkpoint as :meth:`fit` enters ``self.stage`` (after ``on_stage_start``).

        Weights, random streams and the loop counters always come from ``state``. The optimiser,
        schedule and gradient scaler do too, except when the checkpoint was written at the end of
        another stage and ``optimizer_per_stage`` is set: then this stage starts with the fresh
        ones, as in an uninterrupted run. Override to restore recipe state of your own (call super).
        """
        self.model.load_state_dict(state["model"])
        if state.get("stage") != self.stage.name and self.optimizer_per_stage:
            self._restore_rng(state)
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            horizon = getattr(self.scheduler, "total_steps", None)
            self.scheduler.load_state_dict(state["scheduler"])
            if horizon is not None:  # a resume with more epochs stretches the schedule to them
                self.scheduler.total_steps = horizon
        self.scaler.load_state_dict(state["scaler"])
        self._restore_rng(state)

    def _restore_rng(self, state: dict) -> None:
        rng = state.get("rng")
        if rng and len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        else:
            warnings.warn(f"checkpoint was written by {len(rng or [])} process(es), this run has {self.dist.world_size}: "
                          "random streams restart from the seed, so the run will not match an uninterrupted one", stacklevel=2)
            seed_everything(self.cfg.seed + self.dist.rank + self.epoch)

    def read_log(self) -> list[dict]:
        """The rows of ``log.csv`` so far (one per epoch)."""
        return RunLog(self.out_dir).read()


def _sample_ids(dataset: torch.utils.data.Dataset, indices: list[int]) -> list[str] | None:
    """Image ids of ``dataset[indices]`` without loading images, where the dataset lists them."""
    base, mapped = dataset, list(indices)
    while isinstance(base, torch.utils.data.Subset):
        mapped = [int(base.indices[i]) for i in mapped]
        base = base.dataset
    ids = getattr(base, "ids", None)
    return [str(ids[i]) for i in mapped] if ids is not None else None


def build_trainer(config: TrainConfig, **kwargs) -> Trainer:
    """The trainer class named by ``config.trainer``, constructed on ``config``."""
    return get_trainer_class(config.trainer)(config, **kwargs)


__all__ = ["Stage", "TRAINERS", "Trainer", "build_trainer", "get_trainer_class", "load_train_config", "monitor_value",
           "register_trainer"]
