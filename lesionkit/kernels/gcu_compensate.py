"""Public API of GRCSF's fused global compensation (Eq. 1-2 after the squeeze-excitations).

``gcu_compensate`` validates its inputs, picks a backend (see :mod:`lesionkit.kernels.backend`)
and calls ``torch.ops.lesionkit.gcu_compensate`` (cpu) or the pure-PyTorch reference (every
other device: the kernel was written for what a CPU profile showed; no GPU has measured the op).
Fake and autograd registrations of the compiled op live here.
"""

from __future__ import annotations

import torch

from lesionkit.kernels import _library
from lesionkit.kernels.accumulation import acc_dtype, common_dtype
from lesionkit.kernels.backend import OpSpec, register_op, select_backend
from lesionkit.kernels.reference.gcu_compensate import check_gcu_inputs, gcu_compensate_math

OP = register_op(OpSpec("gcu_compensate", cuda=False, triton=False, auto_gpu_order=("reference",)))


if _library.HAS_OPS:

    @torch.library.register_fake("lesionkit::gcu_compensate")
    def _(re_up, up, up_scale, skip, skip_scale, eps):
        batch, _, height, width = skip.shape
        return (torch.empty_like(skip, memory_format=torch.channels_last),
                skip.new_empty((batch, 1, height, width), dtype=acc_dtype(skip.dtype)))

    @torch.library.register_fake("lesionkit::gcu_compensate_backward")
    def _(grad_out, grad_residual, re_up, up, up_scale, skip, skip_scale, eps):
        return (torch.empty_like(skip, memory_format=torch.channels_last),
                torch.empty_like(skip, memory_format=torch.channels_last), torch.empty_like(up_scale),
                torch.empty_like(skip, memory_format=torch.channels_last), torch.empty_like(skip_scale))

    def _setup_context(ctx, inputs, output):
        *tensors, eps = inputs
        ctx.save_for_backward(*tensors)
        ctx.eps = eps

    def _backward(ctx, grad_out, grad_residual):
        re_up, up, up_scale, skip, skip_scale = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(skip)
        grads = torch.ops.lesionkit.gcu_compensate_backward(grad_out, grad_residual, re_up, up, up_scale, skip,
                                                            skip_scale, ctx.eps)
        return (*grads, None)

    torch.library.register_autograd("lesionkit::gcu_compensate", _backward, setup_context=_setup_context)


def gcu_compensate(re_up: torch.Tensor, up: torch.Tensor, up_scale: torch.Tensor, skip: torch.Tensor,
                   skip_scale: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRCSF Eq. 1-2 per pixel, after the squeeze-excitations.

    Args:
        re_up: (B, C, H, W) the down-sampled feature S, aligned to C channels and re-upscaled (RU).
        up: (B, C, H, W) the decoder feature U aligned to C channels.
        up_scale, skip_scale: (B, C) the SE weights of ``up`` and of ``skip``.
        skip: (B, C, H, W) the skip feature F.
        eps: floor of |a| |b| in the cosine similarity.

    Returns:
        ``(out, R)``: out = R * skip + skip in the inputs' dtype and skip's memory layout, and
        R = cos(re_up * up * up_scale, skip * skip_scale) over the channels, (B, 1, H, W) in
        float32 (float64 for float64). Mixed dtypes are promoted to a common one.
    """
    check_gcu_inputs(re_up, up, up_scale, skip, skip_scale, eps)
    re_up, up, up_scale, skip, skip_scale = common_dtype(re_up, up, up_scale, skip, skip_scale)
    if select_backend(OP.name, skip.device) == "reference":
        return gcu_compensate_math(re_up, up, up_scale, skip, skip_scale, eps)
    out, residual = torch.ops.lesionkit.gcu_compensate(re_up, up, up_scale, skip, skip_scale, float(eps))
    # The kernel works channels-last; a channels-first skip gets its output channels-first.
    if skip.is_contiguous() and not out.is_contiguous():
        out = out.contiguous()
    return out, residual
