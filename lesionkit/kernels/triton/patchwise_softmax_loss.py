"""Triton kernels of the patch-wise softmax loss (SegMAE Eq. 5-8, Eq. 12).

Forward: one program per patch reduces its C x P x P squared errors, one program per image
does the max-subtracted softmax. Backward: one program per image computes the per-patch
coefficients, one program per patch writes the gradient. Registered as
``lesionkit::patchwise_softmax_loss_triton`` (+ ``_backward_triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lesionkit.kernels.accumulation import acc_dtype

_PER_IMAGE_BLOCK = 1024


@triton.jit
def _patch_layout(pid, C, H, W, N, cols, P: tl.constexpr, BLOCK_P: tl.constexpr):
    """Offset of patch `pid`'s (b, i) top-left pixel in channel 0, its P x P in-patch offsets
    and their in-bounds mask; channel c adds c * H * W."""
    b = pid // N
    i = pid % N
    r = i // cols
    col = i % cols
    ys = tl.arange(0, BLOCK_P)[:, None]
    xs = tl.arange(0, BLOCK_P)[None, :]
    origin = (b * C * H + r * P) * W + col * P
    return origin, ys * W + xs, (ys < P) & (xs < P)


@triton.jit
def _counted(mask_ptr, base, offs, N, HAS_MASK: tl.constexpr):
    """Which of the patches `offs` of one image enter the softmax: in range and masked."""
    valid = offs < N
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + base + offs, mask=offs < N, other=0) != 0)
    return valid


@triton.jit
def _patch_loss_kernel(pred_ptr, target_ptr, out_ptr, C, H, W, N, cols, inv_count,
                       P: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    origin, within, inside = _patch_layout(pid, C, H, W, N, cols, P, BLOCK_P)
    acc = tl.zeros((BLOCK_P, BLOCK_P), dtype=ACC)
    for c in range(C):
        offs = origin + c * H * W + within
        p = tl.load(pred_ptr + offs, mask=inside, other=0).to(ACC)
        t = tl.load(target_ptr + offs, mask=inside, other=0).to(ACC)
        d = p - t
        acc += d * d
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0) * inv_count)


@triton.jit
def _softmax_kernel(loss_in_ptr, mask_ptr, w_ptr, loss_ptr, N, inv_beta,
                    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * N
    running_max = tl.full((BLOCK,), float("-inf"), ACC)
    count = tl.zeros((BLOCK,), ACC)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = _counted(mask_ptr, base, offs, N, HAS_MASK)
        values = tl.load(loss_in_ptr + base + offs, mask=valid, other=float("-inf"))
        running_max = tl.maximum(running_max, values)
        count += valid.to(ACC)
    lmax = tl.max(running_max, axis=0)
    n = tl.sum(count, axis=0)

    denom = tl.zeros((BLOCK,), ACC)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = _counted(mask_ptr, base, offs, N, HAS_MASK)
        values = tl.load(loss_in_ptr + base + offs, mask=valid, other=0)
        e = tl.where(valid, tl.exp((values - lmax) * inv_beta), 0.0)
        tl.store(w_ptr + base + offs, e, mask=offs < N)
        denom += e
    total_denom = tl.sum(denom, axis=0)

    total = tl.zeros((BLOCK,), ACC)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < N
        w = tl.load(w_ptr + base + offs, mask=inb, other=0) / total_denom
        values = tl.load(loss_in_ptr + base + offs, mask=inb, other=0)
        tl.store(w_ptr + base + offs, w, mask=inb)
        total += w * values
    loss = tl.sum(total, axis=0) / n
    tl.store(loss_ptr + b, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def _coefficient_kernel(grad_loss_ptr, loss_in_ptr, w_ptr, mask_ptr, coef_ptr, N, inv_beta, scale_c,
                        DETACH: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                        ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * N
    count = tl.zeros((BLOCK,), ACC)
    lbar = tl.zeros((BLOCK,), ACC)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = _counted(mask_ptr, base, offs, N, HAS_MASK)
        w = tl.load(w_ptr + base + offs, mask=valid, other=0)
        values = tl.load(loss_in_ptr + base + offs, mask=valid, other=0)
        count += valid.to(ACC)
        lbar += w * values
    n = tl.sum(count, axis=0)
    mean_loss = tl.sum(lbar, axis=0)
    # d loss_b / d L'_i = w_i / n_b * (1 + (L'_i - sum_j w_j L'_j) / beta), times 2 / (C P^2).
    scale = tl.load(grad_loss_ptr + b).to(ACC) / n * scale_c
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < N
        valid = _counted(mask_ptr, base, offs, N, HAS_MASK)
        w = tl.load(w_ptr + base + offs, mask=valid, other=0)
        values = tl.load(loss_in_ptr + base + offs, mask=valid, other=0)
        if DETACH:
            coef = scale * w
        else:
            coef = scale * w * (1.0 + (values - mean_loss) * inv_beta)
        tl.store(coef_ptr + base + offs, tl.where(valid, coef, 0.0), mask=inb)


@triton.jit
def _grad_kernel(pred_ptr, target_ptr, coef_ptr, grad_ptr, C, H, W, N, cols,
                 P: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    origin, within, inside = _patch_layout(pid, C, H, W, N, cols, P, BLOCK_P)
    k = tl.load(coef_ptr + pid)
    for c in range(C):
        offs = origin + c * H * W + within
        p = tl.load(pred_ptr + offs, mask=inside, other=0).to(ACC)
        t = tl.load(target_ptr + offs, mask=inside, other=0).to(ACC)
        tl.store(grad_ptr + offs, (k * (p - t)).to(grad_ptr.dtype.element_ty), mask=inside)


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """The accumulation dtype (docs/ops.md, Precision) as torch and Triton types."""
    acc = acc_dtype(dtype)
    return acc, (tl.float64 if acc == torch.float64 else tl.float32)


def _mask_arg(mask: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    # bool tensors are read as bytes; without a mask the pointer is never dereferenced.
    return fallback if mask is None else mask.contiguous().view(torch.uint8)


@triton_op("lesionkit::patchwise_softmax_loss_triton", mutates_args=())
def patchwise_softmax_loss_triton(
    pred: torch.Tensor, target: torch.Tensor, patch_size: int, beta: float,
    mask: torch.Tensor | None, detach_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pred = pred.contiguous()
    target = target.contiguous()
    batch, channels, height, width = pred.shape
    cols = width // patch_size
    n = (height // patch_size) * cols
    acc_torch, acc_tl = _acc(pred.dtype)
    loss = pred.new_empty((batch,))
    patch_loss = pred.new_empty((batch, n), dtype=acc_torch)
    weights = pred.new_empty((batch, n), dtype=acc_torch)
    if batch == 0:
        return loss, patch_loss, weights
    block_p = triton.next_power_of_2(patch_size)
    wrap_triton(_patch_loss_kernel)[(batch * n,)](
        pred, target, patch_loss, channels, height, width, n, cols,
        1.0 / (channels * patch_size * patch_size), P=patch_size, BLOCK_P=block_p, ACC=acc_tl)
    wrap_triton(_softmax_kernel)[(batch,)](
        patch_loss, _mask_arg(mask, patch_loss), weights, loss, n, 1.0 / beta,
        HAS_MASK=mask is not None, BLOCK=_PER_IMAGE_BLOCK, ACC=acc_tl)
    return loss, patch_loss, weights


@triton_op("lesionkit::patchwise_softmax_loss_backward_triton", mutates_args=())
def patchwise_softmax_loss_backward_triton(
    grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, patch_loss: torch.Tensor,
    weights: torch.Tensor, mask: torch.Tensor | None, patch_size: int, beta: float,
    detach_weights: bool,
) -> torch.Tensor:
    pred = pred.contiguous()
    target = target.contiguous()
    batch, channels, height, width = pred.shape
    cols = width // patch_size
    n = (height // patch_size) * cols
    acc_torch, acc_tl = _acc(pred.dtype)
    grad = torch.empty_like(pred)
    if batch == 0:
        return grad
    coef = patch_loss.new_empty((batch, n))
    wrap_triton(_coefficient_kernel)[(batch,)](
        grad_loss.to(acc_torch).contiguous(), patch_loss.contiguous(), weights.contiguous(),
        _mask_arg(mask, patch_loss), coef, n, 1.0 / beta,
        2.0 / (channels * patch_size * patch_size),
        DETACH=detach_weights, HAS_MASK=mask is not None, BLOCK=_PER_IMAGE_BLOCK, ACC=acc_tl)
    wrap_triton(_grad_kernel)[(batch * n,)](
        pred, target, coef, grad, channels, height, width, n, cols,
        P=patch_size, BLOCK_P=triton.next_power_of_2(patch_size), ACC=acc_tl)
    return grad
