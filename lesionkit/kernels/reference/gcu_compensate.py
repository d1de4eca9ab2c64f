"""GRCSF's global compensation after its squeeze-excitations (Eq. 1-2), plain PyTorch.

With a = re_up * up * up_scale and b = skip * skip_scale (the SE weights broadcast over H, W),
the residual R = sum_c a b / max(|a| |b|, eps) is the cosine similarity of a and b over the
channels (Eq. 1), and the compensated skip feature is out = R * skip + skip (Eq. 2).
"""

from __future__ import annotations

import torch

from lesionkit.kernels.accumulation import acc_dtype


def check_gcu_inputs(re_up: torch.Tensor, up: torch.Tensor, up_scale: torch.Tensor, skip: torch.Tensor,
                     skip_scale: torch.Tensor, eps: float) -> None:
    named = {"re_up": re_up, "up": up, "up_scale": up_scale, "skip": skip, "skip_scale": skip_scale}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} should be a tensor, got {type(t).__name__}")
    for name, t in named.items():
        if not t.is_floating_point():
            raise ValueError(f"{name} should be a floating-point tensor, got {t.dtype}")
    if skip.dim() != 4:
        raise ValueError(f"skip should be a (B, C, H, W) tensor, got {tuple(skip.shape)}")
    for name in ("re_up", "up"):
        if named[name].shape != skip.shape:
            raise ValueError(f"{name} should have skip's shape {tuple(skip.shape)}, got {tuple(named[name].shape)}")
    for name in ("up_scale", "skip_scale"):
        if tuple(named[name].shape) != tuple(skip.shape[:2]):
            raise ValueError(f"{name} should be (B, C) = {tuple(skip.shape[:2])}, got {tuple(named[name].shape)}")
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        raise ValueError(f"gcu_compensate's tensors should be on one device, got {sorted(map(str, devices))}")
    if not eps > 0:
        raise ValueError(f"eps should be > 0, got {eps}")


def gcu_compensate_reference(re_up: torch.Tensor, up: torch.Tensor, up_scale: torch.Tensor, skip: torch.Tensor,
                             skip_scale: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, R): out like ``skip`` (its dtype), R (B, 1, H, W) in float32 (float64 for float64)."""
    check_gcu_inputs(re_up, up, up_scale, skip, skip_scale, eps)
    return gcu_compensate_math(re_up, up, up_scale, skip, skip_scale, eps)


def gcu_compensate_math(re_up: torch.Tensor, up: torch.Tensor, up_scale: torch.Tensor, skip: torch.Tensor,
                        skip_scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gcu_compensate_reference` without the input checks, for callers that made them."""
    acc = acc_dtype(skip.dtype)
    f = skip.to(acc)
    a = re_up.to(acc) * up.to(acc) * up_scale.to(acc)[:, :, None, None]
    b = f * skip_scale.to(acc)[:, :, None, None]
    dot = (a * b).sum(dim=1, keepdim=True)
    # torch's norm gives a zero vector a zero gradient, not NaN; below eps the norms pass none.
    norms = torch.linalg.vector_norm(a, dim=1, keepdim=True) * torch.linalg.vector_norm(b, dim=1, keepdim=True)
    residual = dot / norms.clamp_min(eps)
    return (residual * f + f).to(skip.dtype), residual
