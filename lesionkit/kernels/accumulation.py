"""The accumulation dtype every lesionkit op uses (docs/ops.md, "Precision")."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (gradcheck), float32 for everything else (fp32, bf16, fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


__all__ = ["acc_dtype"]
