"""Public API of the last-dimension LayerNorm with float32 statistics (docs/ops.md).

``layer_norm_last`` validates its inputs, picks a backend (see :mod:`lesionkit.kernels.backend`)
and calls ``torch.ops.lesionkit.layer_norm_last`` (cpu) or the pure-PyTorch reference (every
other device: the kernel answers a CPU profile of the SS2D models under bf16 autocast). Fake and
autograd registrations of the compiled op live here.
"""

from __future__ import annotations

import torch

from lesionkit.kernels import _library
from lesionkit.kernels.accumulation import acc_dtype
from lesionkit.kernels.backend import OpSpec, register_op, select_backend
from lesionkit.kernels.reference.layer_norm import check_layer_norm_inputs, layer_norm_last_math

OP = register_op(OpSpec("layer_norm_last", cuda=False, triton=False, auto_gpu_order=("reference",)))


if _library.HAS_OPS:

    @torch.library.register_fake("lesionkit::layer_norm_last")
    def _(x, weight, bias, eps, out_dtype):
        stats = x.new_empty(x.shape[:-1], dtype=weight.dtype)
        return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)

    @torch.library.register_fake("lesionkit::layer_norm_last_backward")
    def _(grad_out, x, weight, mean, rstd):
        # dx keeps x's strides where the kernel read x in place (a channels-first view), as the CPU op
        dx = torch.empty_like(x) if channels_first_view(x) else x.new_empty(x.shape)
        return dx, torch.empty_like(weight), torch.empty_like(weight)

    def _setup_context(ctx, inputs, output):
        x, weight, _bias, _eps, _out_dtype = inputs
        _out, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None
        dx, dweight, dbias = torch.ops.lesionkit.layer_norm_last_backward(grad_out, x, weight, mean, rstd)
        return dx, dweight, dbias, None, None

    torch.library.register_autograd("lesionkit::layer_norm_last", _backward, setup_context=_setup_context)


def channels_first_view(x: torch.Tensor) -> bool:
    """Whether x (..., C) is a view of channels-first memory, (B, C, ...) contiguous with the
    channels moved last (e.g. ``y.permute(0, 2, 3, 1)`` of a contiguous (B, C, H, W) ``y``): the
    CPU kernel reads such an x in place, tile by tile, and returns dx with x's strides."""
    return (x.dim() >= 3 and x.shape[-1] >= 2 and x.stride(-1) != 1
            and x.movedim(-1, 1).is_contiguous())


def layer_norm_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * weight + bias.

    Args:
        x: (..., C) in any floating dtype, read as it is (a float32 residual stream needs no cast);
            on a CPU a channels-first view (:func:`channels_first_view`) is read in place, with no
            copy, and its gradient comes back in x's layout.
        weight, bias: (C,); cast to the accumulation dtype (float32, float64 for float64 x).
        eps: added to the variance (biased, as ``torch.nn.LayerNorm``).
        out_dtype: dtype of the result; None means x's. Under bf16 autocast the SS2D layers pass
            bf16, the dtype autocast gives a LayerNorm there.

    Returns:
        (..., C) in ``out_dtype``; statistics and products in float32 (float64 for float64).
    """
    check_layer_norm_inputs(x, weight, bias, eps, out_dtype)
    out_dtype = out_dtype or x.dtype
    acc = acc_dtype(x.dtype)
    weight, bias = weight.to(acc), bias.to(acc)
    if select_backend(OP.name, x.device) == "reference":
        return layer_norm_last_math(x, weight, bias, eps, out_dtype)
    return torch.ops.lesionkit.layer_norm_last(x, weight, bias, float(eps), out_dtype)[0]
