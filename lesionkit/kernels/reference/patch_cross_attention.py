"""Patch cross-attention (GRCSF Eq. 6), vectorised PyTorch.

Softmax attention among the P*P positions of every non-overlapping P x P window of
(B, h, d, H, W) maps: the windows are cut out with one view + permute (a copy), every window
attends at once through batched matmuls, and the result is put back into the NCHW layout.
"""

from __future__ import annotations

import math

import torch

from lesionkit.kernels.accumulation import acc_dtype, common_dtype


def check_patch_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 patch_size: int, scale: float | None) -> None:
    """Raise ValueError naming the argument for every input the op cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} should be a tensor, got {type(t).__name__}")
    dims = {"q": "(B, h, dk, H, W)", "k": "(B, h, dk, H, W)", "v": "(B, h, dv, H, W)"}
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 5:
            raise ValueError(f"{name} should be a {dims[name]} tensor, got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k should have the same shape (B, h, dk, H, W), got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if (v.shape[0], v.shape[1], v.shape[3], v.shape[4]) != (q.shape[0], q.shape[1], q.shape[3], q.shape[4]):
        raise ValueError(f"v should match q in B, h, H, W {(q.shape[0], q.shape[1], *q.shape[3:])}"
                         f" (heads and spatial size), got v of shape {tuple(v.shape)}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v should be on the same device, got {q.device}, {k.device} "
                         f"and {v.device}")
    if not (q.dtype.is_floating_point and k.dtype.is_floating_point and v.dtype.is_floating_point):
        raise ValueError(f"q, k and v should be floating tensors, got {q.dtype}, {k.dtype} and "
                         f"{v.dtype}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size should be a positive int, got {patch_size!r}")
    height, width = q.shape[-2:]
    if height == 0 or width == 0 or height % patch_size or width % patch_size:
        raise ValueError(f"H and W should be positive multiples of patch_size={patch_size}, got "
                         f"H={height}, W={width}")
    if q.shape[2] == 0 or v.shape[2] == 0:
        raise ValueError(f"q and v should have at least one channel, got dk={q.shape[2]}, "
                         f"dv={v.shape[2]}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale should be a finite number or None, got {scale!r}")


def resolve_scale(scale: float | None, dk: int) -> float:
    """The softmax scale: `scale`, or 1 / sqrt(dk) when it is None."""
    return float(scale) if scale is not None else 1.0 / math.sqrt(dk)


def partition_windows(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, h, d, H, W) -> (B, h, H/P * W/P, P*P, d): windows row-major, tokens row-major."""
    b, h, d, height, width = x.shape
    p = patch_size
    x = x.reshape(b, h, d, height // p, p, width // p, p).permute(0, 1, 3, 5, 4, 6, 2)
    return x.reshape(b, h, (height // p) * (width // p), p * p, d)


def merge_windows(x: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`partition_windows`: (B, h, N, P*P, d) -> (B, h, d, H, W)."""
    b, h, _, _, d = x.shape
    p = patch_size
    x = x.reshape(b, h, height // p, width // p, p, p, d).permute(0, 1, 6, 2, 4, 3, 5)
    return x.reshape(b, h, d, height, width)


def patch_cross_attention_with_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patch_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (v's dtype) and the per-query log-sum-exp (B, h, H, W), math in float32
    (float64 for float64 inputs); `scale` already resolved."""
    acc = acc_dtype(q.dtype)
    height, width = q.shape[-2:]
    qw = partition_windows(q.to(acc), patch_size)
    kw = partition_windows(k.to(acc), patch_size)
    vw = partition_windows(v.to(acc), patch_size)
    scores = torch.matmul(qw, kw.transpose(-1, -2)) * scale  # (B, h, N, T, T)
    lse = torch.logsumexp(scores, dim=-1)
    # softmax as exp(s - lse): the lse is needed anyway (ATen's softmax over a short last
    # dimension of a 5-D tensor is also much slower on a CPU)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vw)
    out = merge_windows(out, patch_size, height, width).to(v.dtype)
    lse = merge_windows(lse.unsqueeze(-1), patch_size, height, width).squeeze(2)
    return out, lse


def patch_cross_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patch_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference of :func:`lesionkit.kernels.patch_cross_attention` (same arguments)."""
    check_patch_attention_inputs(q, k, v, patch_size, scale)
    q, k, v = common_dtype(q, k, v)
    scale = resolve_scale(scale, q.shape[2])
    return patch_cross_attention_with_lse_reference(q, k, v, patch_size, scale)[0]


def check_patch_attention_mix_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                                     patch_size: int, scale: float | None) -> None:
    """:func:`check_patch_attention_inputs` for M key sets k (M, B, h, dk, H, W) and weights (M,)."""
    for name, t in (("k", k), ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} should be a tensor, got {type(t).__name__}")
    if k.dim() != 6 or k.shape[0] == 0:
        raise ValueError(f"k should be a (M, B, h, dk, H, W) tensor with M >= 1 key sets, got shape "
                         f"{tuple(k.shape)}")
    check_patch_attention_inputs(q, k[0], v, patch_size, scale)
    if weights.shape != (k.shape[0],):
        raise ValueError(f"weights should have shape (M,) = ({k.shape[0]},), one per key set, got "
                         f"{tuple(weights.shape)}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights should be a floating tensor, got {weights.dtype}")
    if weights.device != q.device:
        raise ValueError(f"weights should be on q's device {q.device}, got {weights.device}")


def patch_cross_attention_mix_with_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor, patch_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_m weights[m] softmax(scale q k[m]^T) v per window (v's dtype) and the log-sum-exp of
    every key set (M, B, h, H, W); math in float32 (float64 for float64), `scale` resolved."""
    acc = acc_dtype(q.dtype)
    maps, b = k.shape[:2]
    height, width = q.shape[-2:]
    qw = partition_windows(q.to(acc), patch_size)  # (B, h, N, T, dk)
    kw = partition_windows(k.to(acc).flatten(0, 1), patch_size).unflatten(0, (maps, b))
    vw = partition_windows(v.to(acc), patch_size)
    scores = torch.matmul(qw, kw.transpose(-1, -2)) * scale  # (M, B, h, N, T, T)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    mix = (weights.to(acc).reshape(maps, 1, 1, 1, 1, 1) * probs).sum(0)
    out = merge_windows(torch.matmul(mix, vw), patch_size, height, width).to(v.dtype)
    lse = merge_windows(lse.flatten(0, 1).unsqueeze(-1), patch_size, height, width).squeeze(2)
    return out, lse.unflatten(0, (maps, b))


def patch_cross_attention_mix_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor, patch_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference of :func:`lesionkit.kernels.patch_cross_attention_mix` (same arguments)."""
    check_patch_attention_mix_inputs(q, k, v, weights, patch_size, scale)
    q, k, v = common_dtype(q, k, v)
    scale = resolve_scale(scale, q.shape[2])
    return patch_cross_attention_mix_with_lse_reference(q, k, v, weights, patch_size, scale)[0]

