"""LayerNorm over the last dimension in the accumulation dtype, plain PyTorch: the reference of
:func:`lesionkit.kernels.layer_norm_last`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lesionkit.kernels.accumulation import acc_dtype


def check_layer_norm_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                            out_dtype: torch.dtype | None) -> None:
    """Raise ValueError naming the argument for every input the op cannot take."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} should be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} should be a floating-point tensor, got {t.dtype}")
    if x.dim() == 0:
        raise ValueError("x should have at least one dimension (..., C), got a scalar")
    channels = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} should have shape (C,) = ({channels},), x's last dimension, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} should be on x's device {x.device}, got {t.device}")
    if not eps > 0:
        raise ValueError(f"eps should be > 0, got {eps}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype should be a floating torch.dtype or None, got {out_dtype!r}")


def layer_norm_last_math(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`layer_norm_last_reference` without the input checks."""
    acc = acc_dtype(x.dtype)
    return F.layer_norm(x.to(acc), (x.shape[-1],), weight.to(acc), bias.to(acc), eps).to(out_dtype)


def layer_norm_last_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension, computed in float32
    (float64 for float64) and returned in ``out_dtype`` (default x's dtype)."""
    check_layer_norm_inputs(x, weight, bias, eps, out_dtype)
    return layer_norm_last_math(x, weight, bias, eps, out_dtype or x.dtype)
