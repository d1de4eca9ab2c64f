"""Triton kernels of the patch-wise softmax loss (SegMAE Eq. 5-8, Eq. 12).

Forward: one program per patch reduces its C x P x P squared errors, one program per image
does the max-subtracted softmax. Backward: one program per image computes the per-patch
coefficients, one program per patch writes the gradient. Registered as
``lesionkit::patchwise_softmax_loss_triton`` (+ ``_backward_triton``).

On a GPU Triton types a Python ``float`` argument as fp32, so no real-valued scalar is passed
as one: counts go in as integers and ``1 / beta`` as a one-element tensor of the accumulation
dtype (float64 results would otherwise lose digits). Offsets that can pass 2**31 (a channel
plane times the channel index) are computed in int64, and every launch runs under the
tensors' device so ``cuda:1`` inputs do not run on the current device's stream.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lesionkit.kernels.triton.accumulation import acc_types
from lesionkit.kernels.reference.patchwise_softmax_loss import check_patchwise_inputs

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
def _plane(H, W):
    """H * W in int64: channel c starts c * H * W elements in, past 2**31 for large images."""
    return tl.cast(H, tl.int64) * W


@triton.jit
def _counted(mask_ptr, base, offs, N, HAS_MASK: tl.constexpr):
    """Which of the patches `offs` of one image enter the softmax: in range and masked."""
    valid = offs < N
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + base + offs, mask=offs < N, other=0) != 0)
    return valid


@triton.jit
def _patch_loss_kernel(pred_ptr, target_ptr, out_ptr, C, H, W, N, cols, per_patch,
                       P: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    origin, within, inside = _patch_layout(pid, C, H, W, N, cols, P, BLOCK_P)
    plane = _plane(H, W)
    acc = tl.zeros((BLOCK_P, BLOCK_P), dtype=ACC)
    for c in range(C):
        offs = origin + c * plane + within
        p = tl.load(pred_ptr + offs, mask=inside, other=0).to(ACC)
        t = tl.load(target_ptr + offs, mask=inside, other=0).to(ACC)
        d = p - t
        acc += d * d
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0) / per_patch)  # per_patch = C * P * P


@triton.jit
def _softmax_kernel(loss_in_ptr, mask_ptr, w_ptr, loss_ptr, N, inv_beta_ptr,
                    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    inv_beta = tl.load(inv_beta_ptr)
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
def _coefficient_kernel(grad_loss_ptr, loss_in_ptr, w_ptr, mask_ptr, coef_ptr, N, inv_beta_ptr, per_patch,
                        DETACH: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                        ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    inv_beta = tl.load(inv_beta_ptr)
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
    # d loss_b / d L'_i = w_i / n_b * (1 + (L'_i - sum_j w_j L'_j) / beta), times 2 / (C P^2);
    # per_patch = C * P * P is an integer, so the division stays in ACC.
    scale = tl.load(grad_loss_ptr + b).to(ACC) / n * 2 / per_patch
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
    plane = _plane(H, W)
    for c in range(C):
        offs = origin + c * plane + within
        p = tl.load(pred_ptr + offs, mask=inside, other=0).to(ACC)
        t = tl.load(target_ptr + offs, mask=inside, other=0).to(ACC)
        tl.store(grad_ptr + offs, (k * (p - t)).to(grad_ptr.dtype.element_ty), mask=inside)


def _mask_arg(mask: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    # bool tensors are read as bytes; without a mask the pointer is never dereferenced.
    return fallback if mask is None else mask.contiguous().view(torch.uint8)


def _inv_beta(beta: float, like: torch.Tensor) -> torch.Tensor:
    # A tensor, not a Python float: Triton would type the float fp32 on a GPU.
    return torch.full((1,), 1.0 / beta, dtype=like.dtype, device=like.device)


def _on_device(t: torch.Tensor):
    """Launch under `t`'s CUDA device (current device and stream); nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_inputs(pred: torch.Tensor, target: torch.Tensor, patch_size: int, beta: float,
                  mask: torch.Tensor | None) -> tuple[int, int, int, int]:
    """The checks of the public wrapper, for direct ``torch.ops`` calls; returns B, C, H, W."""
    check_patchwise_inputs(pred, target, patch_size, beta, mask, "none")
    if pred.dtype != target.dtype:
        raise ValueError(f"pred and target should have the same dtype, got {pred.dtype} and {target.dtype}")
    if mask is not None and mask.device != pred.device:
        raise ValueError(f"mask should be on pred's device {pred.device}, got {mask.device}")
    return tuple(pred.shape)


def _check_backward_inputs(grad_loss: torch.Tensor, pred: torch.Tensor, patch_loss: torch.Tensor,
                           weights: torch.Tensor, n: int, acc: torch.dtype) -> None:
    batch = pred.shape[0]
    for name, t, shape in (("grad_loss", grad_loss, (batch,)), ("patch_loss", patch_loss, (batch, n)),
                           ("weights", weights, (batch, n))):
        if t.device != pred.device:
            raise ValueError(f"{name} should be on pred's device {pred.device}, got {t.device}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} should have shape {shape}, got {tuple(t.shape)}")
    for name, t in (("patch_loss", patch_loss), ("weights", weights)):
        if t.dtype != acc:
            raise ValueError(f"{name} should be a {acc} tensor for {pred.dtype} pred, got {t.dtype}")


@triton_op("lesionkit::patchwise_softmax_loss_triton", mutates_args=())
def patchwise_softmax_loss_triton(
    pred: torch.Tensor, target: torch.Tensor, patch_size: int, beta: float,
    mask: torch.Tensor | None, detach_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, channels, height, width = _check_inputs(pred, target, patch_size, beta, mask)
    pred = pred.contiguous()
    target = target.contiguous()
    cols = width // patch_size
    n = (height // patch_size) * cols
    acc_torch, acc_tl = acc_types(pred.dtype)
    loss = pred.new_empty((batch,))
    patch_loss = pred.new_empty((batch, n), dtype=acc_torch)
    weights = pred.new_empty((batch, n), dtype=acc_torch)
    if batch == 0:
        return loss, patch_loss, weights
    block_p = triton.next_power_of_2(patch_size)
    with _on_device(pred):
        wrap_triton(_patch_loss_kernel)[(batch * n,)](
            pred, target, patch_loss, channels, height, width, n, cols,
            channels * patch_size * patch_size, P=patch_size, BLOCK_P=block_p, ACC=acc_tl)
        wrap_triton(_softmax_kernel)[(batch,)](
            patch_loss, _mask_arg(mask, patch_loss), weights, loss, n, _inv_beta(beta, patch_loss),
            HAS_MASK=mask is not None, BLOCK=_PER_IMAGE_BLOCK, ACC=acc_tl)
    return loss, patch_loss, weights


@triton_op("lesionkit::patchwise_softmax_loss_backward_triton", mutates_args=())
def patchwise_softmax_loss_backward_triton(
    grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, patch_loss: torch.Tensor,
    weights: torch.Tensor, mask: torch.Tensor | None, patch_size: int, beta: float,
    detach_weights: bool,
) -> torch.Tensor:
    batch, channels, height, width = _check_inputs(pred, target, patch_size, beta, mask)
    cols = width // patch_size
    n = (height // patch_size) * cols
    acc_torch, acc_tl = acc_types(pred.dtype)
    _check_backward_inputs(grad_loss, pred, patch_loss, weights, n, acc_torch)
    pred = pred.contiguous()
    target = target.contiguous()
    grad = torch.empty_like(pred, memory_format=torch.contiguous_format)
    if grad.numel() == 0:
        return grad
    coef = patch_loss.new_empty((batch, n))
    with _on_device(pred):
        wrap_triton(_coefficient_kernel)[(batch,)](
            grad_loss.to(acc_torch).contiguous(), patch_loss.contiguous(), weights.contiguous(),
            _mask_arg(mask, patch_loss), coef, n, _inv_beta(beta, patch_loss),
            channels * patch_size * patch_size,
            DETACH=detach_weights, HAS_MASK=mask is not None, BLOCK=_PER_IMAGE_BLOCK, ACC=acc_tl)
        wrap_triton(_grad_kernel)[(batch * n,)](
            pred, target, coef, grad, channels, height, width, n, cols,
            P=patch_size, BLOCK_P=triton.next_power_of_2(patch_size), ACC=acc_tl)
    return grad
