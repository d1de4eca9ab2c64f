"""Patch-wise softmax loss (SegMAE Eq. 5-8; Eq. 12 with a patch mask), vectorised PyTorch."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from lesionkit.kernels.accumulation import acc_dtype
from lesionkit.reduction import check_reduction, reduce_loss


def check_patchwise_inputs(
    pred: torch.Tensor,
    target: torch.Tensor,
    patch_size: int,
    beta: float,
    mask: torch.Tensor | None,
    reduction: str,
) -> None:
    """Raise ValueError naming the argument for every input the loss cannot take."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"pred and target should be tensors, got {type(pred).__name__} and "
                        f"{type(target).__name__}")
    if pred.dim() != 4:
        raise ValueError(f"pred should be a (B, C, H, W) tensor, got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target should have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target should be on the same device, got {pred.device} and "
                         f"{target.device}")
    if not pred.dtype.is_floating_point or not target.dtype.is_floating_point:
        raise ValueError(f"pred and target should be floating tensors, got {pred.dtype} and "
                         f"{target.dtype}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size should be a positive int, got {patch_size!r}")
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta should be > 0, got {beta!r}")
    height, width = pred.shape[-2:]
    if height == 0 or width == 0 or height % patch_size or width % patch_size:
        raise ValueError(f"H and W should be positive multiples of patch_size={patch_size}, got "
                         f"H={height}, W={width}")
    check_reduction(reduction)
    if mask is None:
        return
    n_patches = (height // patch_size) * (width // patch_size)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask should be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != (pred.shape[0], n_patches):
        raise ValueError(f"mask should have shape (B, N) = ({pred.shape[0]}, {n_patches}), got "
                         f"{tuple(mask.shape)}")
    if mask.device != pred.device:
        raise ValueError(f"mask should be on pred's device {pred.device}, got {mask.device}")
    # Data-dependent (a host sync on GPU); a compiled graph, and the fake-tensor pass of a
    # triton_op (which runs its Python wrapper on fake tensors), rely on the kernels instead.
    if not torch.compiler.is_compiling() and not is_fake(mask) and pred.shape[0] > 0:
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"mask should have at least one true entry per image, images "
                             f"{empty} have none")


def patchwise_softmax_loss_per_image_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    patch_size: int,
    beta: float,
    mask: torch.Tensor | None = None,
    detach_weights: bool = False,
) -> torch.Tensor:
    """Per-image loss (B,) in pred's dtype; math in float32 (float64 for float64 inputs)."""
    batch, channels, height, width = pred.shape
    p = patch_size
    acc = acc_dtype(pred.dtype)
    err = (pred.to(acc) - target.to(acc)).square()  # Eq. 5
    # Eq. 6: mean over each P x P patch and all channels, patches in row-major order.
    patch_loss = err.view(batch, channels, height // p, p, width // p, p).mean(dim=(1, 3, 5))
    patch_loss = patch_loss.reshape(batch, (height // p) * (width // p))  # -1 is ambiguous for B = 0
    # Eq. 7 with the max subtracted first, so any beta > 0 is safe.
    logits = patch_loss if mask is None else patch_loss.masked_fill(~mask, float("-inf"))
    shifted = (logits - logits.amax(dim=1, keepdim=True).detach()) / beta
    weights = torch.softmax(shifted, dim=1)
    if detach_weights:
        weights = weights.detach()
    count = patch_loss.shape[1] if mask is None else mask.sum(dim=1).to(acc)
    # Eq. 8; with a mask, N counts the patches in the sum (the masked reconstruction loss).
    loss = (weights * patch_loss).sum(dim=1) / count
    return loss.to(pred.dtype)


def patchwise_softmax_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    patch_size: int,
    beta: float,
    mask: torch.Tensor | None = None,
    detach_weights: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference of :func:`lesionkit.kernels.patchwise_softmax_loss` (same arguments)."""
    check_patchwise_inputs(pred, target, patch_size, beta, mask, reduction)
    loss = patchwise_softmax_loss_per_image_reference(
        pred, target, patch_size, beta, mask, detach_weights)
    return reduce_loss(loss, reduction)
