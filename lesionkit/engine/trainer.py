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

Method trainers live in :mod:`lesionkit.engine.trainers`, named in
:data:`lesionkit.engine.registry.TRAINER_MODULES` (or ``@register_trainer("name")``) and selected
with ``trainer: name``. Checkpoint state and resume: :mod:`~lesionkit.engine.resume`; the epoch
order: :mod:`~lesionkit.engine.loaders`; the rest: docs/engine.md.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lesionkit.data.splits import LabelledSubset
from lesionkit.data.transforms import BatchFlips, split_transform_options
from lesionkit.engine import init_weights
from lesionkit.engine.builders import build_loss, build_optimizer, build_train_val_datasets
from lesionkit.engine.config import TrainConfig
from lesionkit.engine.distributed import DistributedContext
from lesionkit.engine.evaluation import (autocast_context, evaluate, flatten_metrics, lower_is_better, monitor_value,
                                        native_bf16, plain_metrics, resolve_precision)
from lesionkit.engine.loaders import EpochOrder
from lesionkit.engine.resume import ResumableRun
from lesionkit.engine.run_log import RunLog
from lesionkit.engine.runtime import StopRequests, default_num_workers, on_terminal, resolve_device, seed_everything, set_determinism
from lesionkit.engine.schedulers import build_scheduler, steps_per_batch
from lesionkit.models import create_model, segmentation_logits


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int


class Trainer(ResumableRun):
    """Supervised segmentation training driven by a :class:`TrainConfig` (``trainer: segmentation``)."""

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
        # The precision this run trains and evaluates in (``auto`` resolved for this device);
        # config.precision keeps what was asked, so a resumed run resolves it again where it runs.
        self.precision = resolve_precision(config.precision, self.device)
        if config.precision == "auto" and self.dist.is_main:
            why = "native bf16" if self.precision == "bf16" else "no native bf16 (AVX-512 BF16 / AMX on a CPU)"
            print(f"precision auto -> {self.precision} on {self.device} ({why})", flush=True)
        if self.precision == "bf16" and not native_bf16(self.device) and self.dist.is_main:
            warnings.warn(f"precision 'bf16' on {self.device}, which has no native bf16 (no AVX-512 BF16 or AMX on "
                          "a CPU): PyTorch emulates it there, several times slower than fp32. Set precision: auto "
                          "(bf16 only where native) or fp32.", RuntimeWarning, stacklevel=2)
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
        label_seed = config.seed if config.data.label_seed is None else config.data.label_seed
        self.labelled = LabelledSubset(train_data, config.data.label_fraction, label_seed)
        self.train_data, self.val_data = self.labelled.data, val_data
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
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.model, self.train_model = self.dist.wrap(self.model, self.device, config.sync_batchnorm,
                                                      self.ddp_find_unused_parameters)

        self.epoch = 0  # completed epochs, over all stages
        self.global_step = 0
        # A better validation value is a higher one (Dice) or, for losses, a lower one.
        self.monitor_sign = -1.0 if lower_is_better(config.monitor) else 1.0
        self.best_metric = -math.inf * self.monitor_sign
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
        from lesionkit.engine.input_stats import resolve_input_statistics

        note = resolve_input_statistics(self.cfg)  # "dataset" -> numbers, before the model exists
        if note and self.dist.is_main:
            print(note, flush=True)
        return create_model(self.cfg.model.name, **self.cfg.model.kwargs)

    def build_loss(self) -> nn.Module:
        return build_loss(self.cfg.loss)

    @property
    def label_subset(self) -> dict | None:
        """The labelled subset this run trains on (``data.label_fraction``), as checkpoints record it."""
        return self.labelled.state_dict()

    def build_datasets(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
        return build_train_val_datasets(self.cfg.data, self.cfg.seed)

    def load_init_weights(self):
        """``init_from``: the matching tensors of ``init_parts`` from another checkpoint; reports the keys."""
        report = init_weights.load_init_weights(self.model, self.cfg.init_from, self.cfg.init_parts)
        if self.dist.is_main:
            print(report.summary(), flush=True)
        return report

    def _num_workers(self) -> int:
        return default_num_workers() if self.cfg.data.num_workers < 0 else self.cfg.data.num_workers

    def build_train_loader(self) -> torch.utils.data.DataLoader:
        # Reseeded per epoch (train_epoch), so a resumed run sees the same batches as an uninterrupted one.
        self._order = EpochOrder(self.train_data, self.cfg.seed, self.dist)
        return self._order.loader(self.train_data, self.cfg.data.batch_size, self._num_workers(),
                                  pin_memory=self.device.type == "cuda")

    def build_val_loader(self) -> torch.utils.data.DataLoader | None:
        if self.val_data is None:
            return None
        bs = self.cfg.data.val_batch_size or 2 * self.cfg.data.batch_size
        return torch.utils.data.DataLoader(self.val_data, batch_size=bs, shuffle=False, num_workers=self._num_workers(),
                                           pin_memory=self.device.type == "cuda")

    def configure_optimizers(self):
        """``(optimizer, scheduler or None)`` for the current stage."""
        opt = build_optimizer(self.cfg.optim, self.model)
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

    def optimize(self, step_fn: Callable[[dict], dict[str, torch.Tensor]], batch: dict,
                 optimizer: torch.optim.Optimizer | None = None, scheduler=None) -> dict[str, torch.Tensor]:
        """One optimiser update on the ``"loss"`` that ``step_fn(batch)`` returns: autocast,
        backward (scaled for fp16), gradient clipping, optimiser and per-step schedule step.
        ``optimizer`` / ``scheduler`` (default: the trainer's) let a recipe give a task its own."""
        if optimizer is None:
            optimizer, scheduler = self.optimizer, self.scheduler
        with autocast_context(self.device, self.precision):
            losses = step_fn(batch)
        if "loss" not in losses:
            raise KeyError(f"{getattr(step_fn, '__name__', 'the step function')} must return a 'loss' entry, got {sorted(losses)}")
        loss = losses["loss"]
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(f"training loss is {loss.item()} at epoch {self.epoch + 1}, step {self.global_step}; "
                                     f"lower optim.lr (now {self.cfg.optim.lr}) or set grad_clip")
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.cfg.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        if steps_per_batch(scheduler):
            if self.cfg.scheduler.horizon == "time_budget" and hasattr(scheduler, "time_progress"):
                scheduler.time_progress = self.elapsed() / self.cfg.time_budget
            scheduler.step()
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
            improved = self.monitor_sign * value > self.monitor_sign * self.best_metric
            if improved:
                self.best_metric, self.best_epoch, self.bad_epochs = value, self.epoch, 0
            else:
                self.bad_epochs += 1
            if self.scheduler is not None and not steps_per_batch(self.scheduler):
                self.scheduler.step(self.monitor_sign * value)  # plateau maximises
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
        # A mid-epoch resume: the same order, without the batches already trained on.
        self._order.start_epoch(self.epoch, skip=self._epoch_batches * self.cfg.data.batch_size)
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
        self._order.end_epoch()
        return self.dist.mean_floats({k: (v / max(1, count)).item() for k, v in sums.items()}), stop

    def _after_step(self, batches_done: int) -> str | None:
        """Mid-epoch checkpoints and the reasons to stop inside an epoch (agreed by every rank)."""
        due = self.checkpoint_due()
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
        """Rank 0's BatchNorm statistics on every rank, as the checkpoint holds them."""
        self.dist.broadcast_buffers(self.model)

    def to_device(self, batch: dict) -> dict:
        out = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if self.cfg.channels_last and out["image"].ndim == 4:
            out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
        return out

    def validate(self) -> dict | None:
        """``SegmentationMetrics.compute()`` on the validation data (rank 0 only), or ``None``."""
        if self.val_loader is None or not self.dist.is_main:
            return None
        result = evaluate(self.model, self.val_loader, self.device, self.cfg.threshold, self.precision,
                          progress=self.cfg.progress, desc="validate", hd95=self.cfg.val_hd95,
                          model_inputs=self.model_inputs,
                          loss_fn=self.loss_fn if self.cfg.monitor == "loss" else None)
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

    def read_log(self) -> list[dict]:
        """The rows of ``log.csv`` so far (one per epoch)."""
        return RunLog(self.out_dir).read()


__all__ = ["Stage", "Trainer"]
