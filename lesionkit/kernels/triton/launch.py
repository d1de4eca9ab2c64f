"""Launch helpers shared by the newer Triton kernels: device guard and shared-memory budget."""

from __future__ import annotations

import contextlib

import torch

# Opt-in shared memory per block: H100 / H200 (sm_90) 227 KB, A100 (sm_80) 163 KB, consumer
# Ampere / Ada (sm_86, sm_89) 99 KB. Used where the device cannot be asked (the interpreter).
SM90_SHARED_BYTES = 227 * 1024


def on_device(t: torch.Tensor):
    """Launch under `t`'s CUDA device (current device and stream); nothing to do on the CPU.

    Without it a ``cuda:1`` tensor would be launched on the current device's stream."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def shared_memory_budget(device: torch.device) -> int:
    """Bytes of shared memory one program may use on `device` (the opt-in per-block limit)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or SM90_SHARED_BYTES)
    return SM90_SHARED_BYTES
