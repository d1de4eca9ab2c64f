"""Public API of the patch cross-attention (GRCSF Eq. 6).

``patch_cross_attention`` validates its inputs, picks a backend (see
:mod:`lesionkit.kernels.backend`) and calls ``torch.ops.lesionkit.patch_cross_attention`` (cpu,
cuda), ``torch.ops.lesionkit.patch_cross_attention_triton`` (triton) or the pure-PyTorch
reference. Fake and autograd registrations of the compiled and Triton ops live here. The ops
return the output and the per-query log-sum-exp; the backward recomputes the softmax from it.
"""

from __future__ import annotations

import torch

from lesionkit.kernels import _library
from lesionkit.kernels.accumulation import acc_dtype, common_dtype
from lesionkit.kernels.backend import OpSpec, lazy_triton_module, register_op, select_backend
from lesionkit.kernels.reference.patch_cross_attention import (
    check_patch_attention_inputs,
    check_patch_attention_mix_inputs,
    patch_cross_attention_mix_with_lse_reference,
    patch_cross_attention_with_lse_reference,
    resolve_scale,
)

# auto on a GPU takes the reference: on the first H200 run (README "GPU, first run", P 16) its
# forward + backward took 5.9 ms, the Triton kernels' 33.7 ms and the CUDA kernels' 42.4 ms.
OP = register_op(OpSpec("patch_cross_attention", auto_gpu_order=("reference", "triton", "cuda")))
# The M-key-set form has a CPU kernel only (written for what a CPU profile of GRCSF showed); on
# other devices it runs the reference.
OP_MIX = register_op(OpSpec("patch_cross_attention_mix", cuda=False, triton=False, auto_gpu_order=("reference",)))




def _setup_context(ctx, inputs, output):
    q, k, v, patch_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.patch_size, ctx.scale = patch_size, scale
    ctx.mark_non_differentiable(lse)


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, ctx.patch_size, ctx.scale)
        return dq, dk, dv, None, None

    return backward


def _fake_outputs(q, k, v, patch_size):
    batch, heads, _, height, width = q.shape
    torch._check(height % patch_size == 0 and width % patch_size == 0)
    out = v.new_empty((batch, heads, v.shape[2], height, width))
    return out, q.new_empty((batch, heads, height, width), dtype=acc_dtype(q.dtype))


if _library.HAS_OPS:

    @torch.library.register_fake("lesionkit::patch_cross_attention")
    def _(q, k, v, patch_size, scale):
        return _fake_outputs(q, k, v, patch_size)

    @torch.library.register_fake("lesionkit::patch_cross_attention_backward")
    def _(grad_out, q, k, v, out, lse, patch_size, scale):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format),
                torch.empty_like(v, memory_format=torch.contiguous_format))

    torch.library.register_autograd(
        "lesionkit::patch_cross_attention",
        _make_backward(torch.ops.lesionkit.patch_cross_attention_backward.default),
        setup_context=_setup_context,
    )

    # The mix kernels read their inputs through their strides and write each output in the
    # layout of the input it belongs to (empty_like: out and dv like v, dq like q, dk like k).
    @torch.library.register_fake("lesionkit::patch_cross_attention_mix")
    def _(q, k, v, weights, patch_size, scale):
        batch, heads, _, height, width = q.shape
        torch._check(height % patch_size == 0 and width % patch_size == 0)
        return torch.empty_like(v), q.new_empty((k.shape[0], batch, heads, height, width), dtype=acc_dtype(q.dtype))

    @torch.library.register_fake("lesionkit::patch_cross_attention_mix_backward")
    def _(grad_out, q, k, v, weights, lse, patch_size, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(weights)

    def _mix_setup_context(ctx, inputs, output):
        q, k, v, weights, patch_size, scale = inputs
        ctx.save_for_backward(q, k, v, weights, output[1])
        ctx.patch_size, ctx.scale = patch_size, scale
        ctx.mark_non_differentiable(output[1])

    def _mix_backward(ctx, grad_out, _grad_lse):
        q, k, v, weights, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None
        grads = torch.ops.lesionkit.patch_cross_attention_mix_backward(
            grad_out, q, k, v, weights, lse, ctx.patch_size, ctx.scale)
        return (*grads, None, None)

    torch.library.register_autograd("lesionkit::patch_cross_attention_mix", _mix_backward,
                                    setup_context=_mix_setup_context)

_triton = lazy_triton_module("patch_cross_attention", lambda t: torch.library.register_autograd(
    "lesionkit::patch_cross_attention_triton", _make_backward(t.patch_cross_attention_backward_triton),
    setup_context=_setup_context))


def patch_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patch_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention inside every non-overlapping P x P window (GRCSF Eq. 6).

    Args:
        q, k: (B, h, dk, H, W) queries and keys; v: (B, h, dv, H, W) values; one device, H and W
            multiples of `patch_size`. Mixed dtypes are promoted to a common one.
        patch_size: side P of the windows; the P*P positions of a window are its tokens and
            each query attends to the P*P keys of its own window only.
        scale: multiplies q . k before the softmax; None means 1 / sqrt(dk).

    Returns:
        (B, h, dv, H, W) in the inputs' dtype (accumulation in float32, float64 for float64).
    """
    check_patch_attention_inputs(q, k, v, patch_size, scale)
    q, k, v = common_dtype(q, k, v)
    scale = resolve_scale(scale, q.shape[2])
    backend = select_backend(OP.name, q.device)
    if backend == "reference":
        return patch_cross_attention_with_lse_reference(q, k, v, patch_size, scale)[0]
    if backend == "triton":
        return _triton().patch_cross_attention_triton(q, k, v, patch_size, scale)[0]
    return torch.ops.lesionkit.patch_cross_attention(q, k, v, patch_size, scale)[0]


def patch_cross_attention_mix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    patch_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Weighted sum of M patch cross-attentions that share q and v (GRCSF Eq. 6, both maps).

    out = sum_m weights[m] * patch_cross_attention(q, k[m], v, patch_size, scale), computed as
    (sum_m weights[m] P_m) v per window, so v is multiplied once (and its gradient products are
    made once) however many key sets there are.

    Args:
        q: (B, h, dk, H, W) queries; k: (M, B, h, dk, H, W), M key sets; v: (B, h, dv, H, W)
            values; H and W multiples of `patch_size`. Mixed dtypes are promoted to a common one.
        weights: (M,) the weight of each key set's attention (differentiable); cast to the
            accumulation dtype (float32, float64 for float64 inputs).
        patch_size, scale: as in :func:`patch_cross_attention`.

    Returns:
        (B, h, dv, H, W) in the inputs' dtype (accumulation in float32, float64 for float64).
    """
    check_patch_attention_mix_inputs(q, k, v, weights, patch_size, scale)
    q, k, v = common_dtype(q, k, v)
    weights = weights.to(acc_dtype(q.dtype))
    scale = resolve_scale(scale, q.shape[2])
    if select_backend(OP_MIX.name, q.device) == "reference":
        return patch_cross_attention_mix_with_lse_reference(q, k, v, weights, patch_size, scale)[0]
    return torch.ops.lesionkit.patch_cross_attention_mix(q, k, v, weights, patch_size, scale)[0]
