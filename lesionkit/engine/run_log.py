"""What a run writes as it goes: ``log.csv`` (one row per epoch), ``steps.csv`` (the training
loss of every step), ``curves.png`` and TensorBoard scalars.

Only the main process writes. Rows are rewritten atomically, so a kill leaves a readable file.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any


class RunLog:
    """The per-epoch log of one run in ``out_dir``."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "log.csv"
        self.steps_path = self.out_dir / "steps.csv"
        self._pending_steps: list[tuple] = []
        self._tb = _tensorboard_writer(self.out_dir / "tensorboard") if tensorboard else None

    def start(self, resume_epoch: int | None, resume_step: int = 0) -> None:
        """A fresh log, or, resuming after ``resume_epoch`` completed epochs and ``resume_step``
        steps, the rows up to them.

        Rows written after the checkpoint we resume from (a kill between log and save) are dropped.
        """
        if resume_epoch is None:
            self.path.unlink(missing_ok=True)
            self.steps_path.unlink(missing_ok=True)
            return
        if self.path.exists():
            self._write_rows(self.path, [r for r in self.read() if int(r["epoch"]) <= resume_epoch])
        if self.steps_path.exists():
            self._write_rows(self.steps_path, [r for r in self.read_steps() if int(r["step"]) <= resume_step])

    def add_step(self, step: int, epoch: float, loss: Any) -> None:
        """Remember one step's total loss (a tensor stays on its device until :meth:`flush`)."""
        self._pending_steps.append((step, epoch, loss))

    def flush(self) -> None:
        """Append the remembered steps to ``steps.csv`` (at epoch ends and checkpoints)."""
        if not self._pending_steps:
            return
        new = not self.steps_path.exists()
        with self.steps_path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "epoch", "loss"])
            writer.writerows([(step, f"{epoch:.4f}", f"{float(loss):.6g}") for step, epoch, loss in self._pending_steps])
        self._pending_steps = []

    def read_steps(self) -> list[dict]:
        if not self.steps_path.exists():
            return []
        with self.steps_path.open(newline="") as f:
            return list(csv.DictReader(f))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def append(self, logs: dict[str, Any]) -> dict[str, Any]:
        """Add one epoch's row (also to TensorBoard, at ``logs["epoch"]``), redraw ``curves.png``; returns the row as written."""
        from lesionkit.engine.curves import plot_curves

        self.flush()
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in logs.items()}
        rows = self.read() + [row]
        self._write_rows(self.path, rows)
        plot_curves(rows, self.out_dir / "curves.png", steps=self.read_steps())
        if self._tb is not None:
            for k, v in logs.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._tb.add_scalar(k, v, logs["epoch"])
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    @staticmethod
    def _write_rows(path: Path, rows: list[dict]) -> None:
        fields: list[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(f"tensorboard: true needs the tensorboard package ({err}); install lesionkit[tensorboard]") from err
    return SummaryWriter(str(path))


__all__ = ["RunLog"]
