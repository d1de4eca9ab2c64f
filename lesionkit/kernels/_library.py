"""Loads the compiled operator library `lesionkit._C` once and records why it failed if it did."""

from __future__ import annotations

import torch

HAS_OPS = False
LOAD_ERROR: str | None = None

try:
    from lesionkit import _C  # noqa: F401  (registers torch.ops.lesionkit.*)

    HAS_OPS = True
except ImportError as exc:  # keep the real reason: info() and backend errors show it
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

REBUILD_COMMAND = "pip install --no-build-isolation -e ."
CUDA_REBUILD_COMMAND = (
    "CUDA_HOME=<toolkit root> LESIONKIT_FORCE_CUDA=1 pip install --no-build-isolation -e ."
)


def build_facts() -> dict[str, str]:
    """Facts the compiled library reports about itself (empty when it is not loaded)."""
    if not HAS_OPS:
        return {}
    raw = torch.ops.lesionkit._build_info()
    return dict(item.split("=", 1) for item in raw.split(";") if "=" in item)


# A constant for torch.compile: the registry does not change while a graph runs, and dynamo
# cannot trace the dispatcher query itself.
@torch.compiler.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `lesionkit::<op>` has a compiled kernel for `dispatch_key` ("CPU", "CUDA")."""
    if not HAS_OPS:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lesionkit::{op}", dispatch_key)
