"""Public API of the patch-wise softmax loss (SegMAE Eq. 5-8 and the masked Eq. 12).

``patchwise_softmax_loss`` validates its inputs, picks a backend (see
:mod:`lesionkit.kernels.backend`) and calls ``torch.ops.lesionkit.patchwise_softmax_loss`` (cpu,
cuda), ``torch.ops.lesionkit.patchwise_softmax_loss_triton`` (triton) or the pure-PyTorch
reference. Fake and autograd registrations of the compiled and Triton ops live here.
"""

from __future__ import annotations

import torch

from lesionkit.kernels import _library
from lesionkit.kernels.accumulation import acc_dtype, common_dtype
from lesionkit.kernels.backend import OpSpec, lazy_triton_module, register_op, select_backend
from lesionkit.kernels.reference.patchwise_softmax_loss import (
    check_patchwise_inputs,
    patchwise_softmax_loss_per_image_reference,
)
from lesionkit.reduction import reduce_loss

OP = register_op(OpSpec("patchwise_softmax_loss", auto_gpu_order=("cuda", "triton", "reference")))


def _setup_context(ctx, inputs, output):
    pred, target, patch_size, beta, mask, detach_weights = inputs
    _, patch_loss, weights = output
    ctx.save_for_backward(pred, target, patch_loss, weights, mask)
    ctx.patch_size, ctx.beta, ctx.detach_weights = patch_size, beta, detach_weights
    ctx.mark_non_differentiable(patch_loss, weights)


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _grad_patch_loss, _grad_weights):
        pred, target, patch_loss, weights, mask = ctx.saved_tensors
        grad_pred = grad_target = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad = backward_op(grad_loss, pred, target, patch_loss, weights, mask,
                               ctx.patch_size, ctx.beta, ctx.detach_weights)
            grad_pred = grad if ctx.needs_input_grad[0] else None
            grad_target = -grad if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None, None, None

    return backward


if _library.HAS_OPS:

    @torch.library.register_fake("lesionkit::patchwise_softmax_loss")
    def _(pred, target, patch_size, beta, mask, detach_weights=False):
        batch, _, height, width = pred.shape
        torch._check(height % patch_size == 0 and width % patch_size == 0)
        n = (height // patch_size) * (width // patch_size)
        acc = acc_dtype(pred.dtype)
        return (pred.new_empty((batch,)), pred.new_empty((batch, n), dtype=acc),
                pred.new_empty((batch, n), dtype=acc))

    @torch.library.register_fake("lesionkit::patchwise_softmax_loss_backward")
    def _(grad_loss, pred, target, patch_loss, weights, mask, patch_size, beta, detach_weights):
        return torch.empty_like(pred, memory_format=torch.contiguous_format)

    torch.library.register_autograd(
        "lesionkit::patchwise_softmax_loss",
        _make_backward(torch.ops.lesionkit.patchwise_softmax_loss_backward.default),
        setup_context=_setup_context,
    )

_triton = lazy_triton_module("patchwise_softmax_loss", lambda t: torch.library.register_autograd(
    "lesionkit::patchwise_softmax_loss_triton", _make_backward(t.patchwise_softmax_loss_backward_triton),
    setup_context=_setup_context))


def patchwise_softmax_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    patch_size: int,
    beta: float,
    mask: torch.Tensor | None = None,
    detach_weights: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Patch-wise softmax-weighted squared error (SegMAE Eq. 5-8).

    Args:
        pred, target: (B, C, H, W) floating tensors on one device; H and W multiples of
            `patch_size`. Mixed dtypes are promoted to a common one.
        patch_size: side P of the square patches; patches are numbered row-major.
        beta: softmax temperature (> 0); large beta tends to plain MSE / N.
        mask: optional bool (B, N) patch mask, N = (H / P) * (W / P); only masked patches enter
            the softmax and the sum, and N becomes their count (the MAE loss, Eq. 12).
        detach_weights: treat the softmax weights as constants in the backward.
        reduction: "mean" or "sum" over the batch, or "none" for the (B,) per-image losses.
    """
    check_patchwise_inputs(pred, target, patch_size, beta, mask, reduction)
    pred, target = common_dtype(pred, target)
    backend = select_backend(OP.name, pred.device)
    if backend == "reference":
        loss = patchwise_softmax_loss_per_image_reference(
            pred, target, patch_size, beta, mask, detach_weights)
    elif backend == "triton":
        loss = _triton().patchwise_softmax_loss_triton(pred, target, patch_size, float(beta), mask, detach_weights)[0]
    else:
        loss = torch.ops.lesionkit.patchwise_softmax_loss(
            pred, target, patch_size, float(beta), mask, detach_weights)[0]
    return reduce_loss(loss, reduction)
