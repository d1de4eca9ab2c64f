"""The accumulation dtype every lesionkit op uses (docs/ops.md, "Precision")."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (gradcheck), float32 for everything else (fp32, bf16, fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in their promoted common dtype (each one unchanged if it already has it)."""
    common = tensors[0].dtype
    for t in tensors[1:]:
        common = torch.promote_types(common, t.dtype)
    return tuple(t.to(common) for t in tensors)


__all__ = ["acc_dtype", "common_dtype"]
