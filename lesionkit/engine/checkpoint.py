"""Checkpoints: atomic writes, ``weights_only`` loads, and RNG state capture.

A checkpoint is a dict of tensors and primitives only, so ``torch.load(weights_only=True)``
reads it without unpickling arbitrary objects.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lesionkit

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, rename.

    A process killed mid-write leaves the previous file intact (``os.replace`` is atomic on
    POSIX and Windows within one file system).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a lesionkit checkpoint with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {str(path)!r} could not be read: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "model_name" not in state:
        raise ValueError(f"{str(path)!r} is not a lesionkit checkpoint (no 'model' / 'model_name' entries)")
    return state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and primitives."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_primitive(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_from_primitive(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _to_primitive(value: Any) -> Any:
    # random.getstate() is nested tuples; lists survive every serialiser.
    return [_to_primitive(v) for v in value] if isinstance(value, tuple) else value


def _from_primitive(value: Any) -> Any:
    return tuple(_from_primitive(v) for v in value) if isinstance(value, list) else value


def checkpoint_header(model_name: str, model_kwargs: dict, config: dict) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "lesionkit_version": lesionkit.__version__,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "config": config,
    }


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "<checkpoint>", expected_model: str | None = None) -> torch.nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights."""
    from lesionkit.models import create_model

    name = state["model_name"]
    if expected_model is not None and expected_model != name:
        raise ValueError(f"checkpoint {str(path)!r} holds model {name!r}, not {expected_model!r}")
    # Pre-trained weights are about to be overwritten: do not fetch them (timm does the same).
    kwargs = {k: v for k, v in state.get("model_kwargs", {}).items() if k not in ("pretrained", "pretrained_file")}
    model = create_model(name, **kwargs)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {str(path)!r} does not fit model {name!r} with options {state.get('model_kwargs')}: {err}") from err
    return model
