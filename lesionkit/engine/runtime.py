"""Where and how a run executes: seeding, determinism, device choice and data-loader workers."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from typing import Any

import numpy as np
import torch

from lesionkit.host import available_cpus, on_terminal  # noqa: F401  (engine modules import them from here)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the training loader.

    torch seeds each worker from the loader's generator; numpy and random are derived from it
    too. Workers ignore SIGINT: Ctrl-C on a terminal reaches the whole process group, and the
    main process handles it (a checkpoint, then a clean stop) only if its workers live on.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs (CUDA docs, "Reproducibility").
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a bare ``cuda`` -> this process's local rank."""
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
    # On 2 cores a worker process steals the compute the model needs; above that, overlap decoding.
    cpus = available_cpus()
    return 0 if cpus <= 2 else min(8, cpus - 1)


class StopRequests:
    """SIGTERM / SIGINT inside ``with StopRequests() as stop:``: the first sets ``stop.received``
    (the training loop checkpoints and stops after the current step); the handlers then go back
    to the defaults, so a second one ends the process at once. Installed in the main thread only."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), signal.SIGINT) if s is not None)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name}: writing a checkpoint after this step, then stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


__all__ = ["StopRequests", "available_cpus", "default_num_workers", "init_worker", "on_terminal", "resolve_device", "seed_everything", "set_determinism"]
