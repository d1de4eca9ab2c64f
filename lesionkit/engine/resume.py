"""What a run's checkpoint holds and how ``--resume`` restores it, bit for bit.

:class:`ResumableRun` is the part of :class:`~lesionkit.engine.trainer.Trainer` that writes
``last.pt`` / ``best.pt`` (:meth:`~ResumableRun.state_dict`, :meth:`~ResumableRun.save`) and
reads them back (:meth:`~ResumableRun.resume`, then :meth:`~ResumableRun.load_resume_state` as
the loop enters the checkpoint's stage). The files themselves are :mod:`lesionkit.engine.checkpoint`'s.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from lesionkit.engine.checkpoint import capture_rng_state, checkpoint_header, load_checkpoint, restore_rng_state, save_checkpoint
from lesionkit.engine.runtime import seed_everything


class ResumableRun:
    """Checkpoint state of a :class:`~lesionkit.engine.trainer.Trainer` (a base class of it; uses its fields)."""

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
            "label_subset": self.labelled.state_dict(),
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

    def checkpoint_due(self) -> bool:
        """Whether ``checkpoint.every_steps`` / ``every_minutes`` ask for a mid-epoch ``last.pt`` now."""
        ck = self.cfg.checkpoint
        return (ck.every_steps is not None and self.global_step % ck.every_steps == 0) or (
            ck.every_minutes is not None and time.monotonic() - self._last_save >= 60 * ck.every_minutes)

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
        # Train on the labelled subset the checkpoint recorded (data.label_fraction).
        if self.labelled.load_state_dict(state.get("label_subset"), f"checkpoint {str(path)!r}"):
            self.train_data = self.labelled.data
            self.train_loader = self.build_train_loader()
            self.steps_per_epoch = len(self.train_loader)
        self._epoch_batches = int(state.get("epoch_batches", 0))
        self._epoch_sums = {k: float(v) for k, v in (state.get("epoch_sums") or {}).items()}
        if self._epoch_batches >= self.steps_per_epoch:
            raise ValueError(f"checkpoint {str(path)!r} is {self._epoch_batches} batches into an epoch, but an epoch "
                             f"of this run has {self.steps_per_epoch}: resume with the data and batch size it was written with")
        self._resume_state = state

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


__all__ = ["ResumableRun"]
