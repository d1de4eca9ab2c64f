"""The accumulation dtype (docs/ops.md, Precision) as the torch and Triton types a launcher needs."""

from __future__ import annotations

import torch
import triton.language as tl

from lesionkit.kernels.accumulation import acc_dtype


def acc_types(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """``(torch dtype, Triton dtype)`` of the accumulation for inputs of ``dtype``."""
    acc = acc_dtype(dtype)
    return acc, (tl.float64 if acc == torch.float64 else tl.float32)
