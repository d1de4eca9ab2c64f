"""Public API of the selective scan and the fused SS2D core (docs/ops.md); cross-scan /
cross-merge are in :mod:`lesionkit.kernels.cross_scan` (re-exported here).

Each function validates its inputs, picks a backend (see :mod:`lesionkit.kernels.backend`) and
calls ``torch.ops.lesionkit.*`` (cpu, cuda), the Triton op (triton) or the pure-PyTorch
reference. Fake and autograd registrations of the compiled and Triton ops live here.
"""

from __future__ import annotations

import torch

from lesionkit.kernels import _library
from lesionkit.kernels.accumulation import acc_dtype
from lesionkit.kernels.backend import OpSpec, export_chunk_size, register_op, select_backend
from lesionkit.kernels.cross_scan import DIRECTIONS, cross_merge, cross_scan  # noqa: F401
from lesionkit.kernels.reference.export_scan import selective_scan_2d_export, selective_scan_export
from lesionkit.kernels.reference.selective_scan import (
    check_out_dtype,
    check_selective_scan_2d_inputs,
    check_selective_scan_inputs,
    selective_scan_2d_reference,
    selective_scan_reference,
)

SCAN = register_op(OpSpec("selective_scan", triton=False, auto_gpu_order=("cuda", "reference")))
SCAN_2D = register_op(OpSpec("selective_scan_2d", triton=False,
                             auto_gpu_order=("cuda", "reference")))

SCAN_CHUNK = 512  # csrc/selective_scan.h kScanChunk: steps between the forward's checkpoints


def _chunks(length):
    return (length + SCAN_CHUNK - 1) // SCAN_CHUNK


# --- selective_scan ------------------------------------------------------------------------


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, _out_dtype = inputs
    _, _, checkpoints = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints)
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(checkpoints)


def _scan_backward(ctx, grad_out, grad_last, _grad_checkpoints):
    u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias = torch.ops.lesionkit.selective_scan_backward(
        grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, checkpoints)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None, None)


def _scan_2d_setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, dt_bias, dt_softplus, _out_dtype = inputs
    _, checkpoints = output
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, checkpoints)
    ctx.dt_softplus = dt_softplus
    ctx.mark_non_differentiable(checkpoints)


def _scan_2d_backward(ctx, grad_out, _grad_checkpoints):
    x, dt, A, B, C, D, dt_bias, checkpoints = ctx.saved_tensors
    grads = torch.ops.lesionkit.selective_scan_2d_backward(
        grad_out, x, dt, A, B, C, D, dt_bias, ctx.dt_softplus, checkpoints)
    return (*grads, None, None)


if _library.HAS_OPS:

    @torch.library.register_fake("lesionkit::selective_scan")
    def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_dtype=None):
        batch, dim, length = u.shape
        n = A.shape[1]
        acc = acc_dtype(u.dtype)
        out_dtype = check_out_dtype(out_dtype, u.dtype)
        return (torch.empty_like(u, dtype=out_dtype, memory_format=torch.contiguous_format),
                u.new_empty((batch, dim, n), dtype=acc),
                u.new_empty((batch, dim, _chunks(length), n), dtype=acc))

    @torch.library.register_fake("lesionkit::selective_scan_backward")
    def _(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
          checkpoints):
        def like(t):
            return torch.empty_like(t, memory_format=torch.contiguous_format)

        return (like(u), like(u), like(A), like(B), like(C),
                like(D) if D is not None else A.new_empty((0,)),
                like(u) if z is not None else u.new_empty((0,)),
                like(delta_bias) if delta_bias is not None else A.new_empty((0,)))

    @torch.library.register_fake("lesionkit::selective_scan_2d")
    def _(x, dt, A, B, C, D, dt_bias, dt_softplus, out_dtype=None):
        batch, dim, height, width = x.shape
        n = A.shape[2]
        out_dtype = check_out_dtype(out_dtype, x.dtype)
        return (torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format),
                x.new_empty((batch, DIRECTIONS, dim, _chunks(height * width), n),
                            dtype=acc_dtype(x.dtype)))

    @torch.library.register_fake("lesionkit::selective_scan_2d_backward")
    def _(grad_out, x, dt, A, B, C, D, dt_bias, dt_softplus, checkpoints):
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                     for t in (x, dt, A, B, C, D, dt_bias))

    torch.library.register_autograd("lesionkit::selective_scan", _scan_backward,
                                    setup_context=_scan_setup_context)
    torch.library.register_autograd("lesionkit::selective_scan_2d", _scan_2d_backward,
                                    setup_context=_scan_2d_setup_context)

def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective scan (S6), mamba_ssm ``selective_scan_fn`` semantics.

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = <C_t, h_t> + D u_t, y *= silu(z), with
    dt = softplus(delta + delta_bias) when `delta_softplus` (else delta + delta_bias).

    Args:
        u, delta: (b, d, l) in float32, float16, bfloat16 (or float64).
        A: (d, n) float32 (float64 with float64 inputs), n in [1, 256].
        B, C: (b, g, n, l) with d % g == 0, or (b, n, l) meaning g = 1; u's dtype.
        D, delta_bias: optional (d,) float32. z: optional (b, d, l) gate, u's dtype.
        return_last_state: also return the final state (b, d, n) in float32.
        out_dtype: None (u's dtype) or torch.float32 for float16 / bfloat16 inputs: the output
            unrounded, as the scan accumulates it (gradients flow back in float32 too).
    Returns:
        y (b, d, l) in u's dtype (or out_dtype), and the last state when asked.
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = check_out_dtype(out_dtype, u.dtype)
    backend = select_backend(SCAN.name, u.device)
    if backend == "reference" and export_chunk_size() is not None:
        return selective_scan_export(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                     return_last_state, chunk_size=export_chunk_size(),
                                     out_dtype=out_dtype)
    if backend == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                        return_last_state, out_dtype=out_dtype)
    out, last_state, _ = torch.ops.lesionkit.selective_scan(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
        None if out_dtype == u.dtype else out_dtype)
    return (out, last_state) if return_last_state else out


def selective_scan_2d(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    dt_softplus: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The SS2D core (VMamba / VM-UNet) fused: cross_merge(selective_scan(cross_scan(x))).

    All tensors are in spatial layout and each of the 4 directions (row-major, column-major,
    both reversed) is read through its index map, so no (B, 4, D, H*W) copy is made.

    Args:
        x: (B, D, H, W). dt: (B, 4, D, H, W), direction k's delta at each pixel.
        A: (4, D, N) float32. B, C: (B, 4, N, H, W). D, dt_bias: (4, D) float32.
        out_dtype: None (x's dtype) or torch.float32 for float16 / bfloat16 inputs.
    Returns:
        (B, D, H, W) in x's dtype (or out_dtype): the four directions' outputs mapped back and
        summed.
    """
    check_selective_scan_2d_inputs(x, dt, A, B, C, D, dt_bias)
    out_dtype = check_out_dtype(out_dtype, x.dtype)
    backend = select_backend(SCAN_2D.name, x.device)
    if backend == "reference" and export_chunk_size() is not None:
        return selective_scan_2d_export(x, dt, A, B, C, D, dt_bias, bool(dt_softplus),
                                        chunk_size=export_chunk_size(), out_dtype=out_dtype)
    if backend == "reference":
        return selective_scan_2d_reference(x, dt, A, B, C, D, dt_bias, bool(dt_softplus),
                                           out_dtype=out_dtype)
    return torch.ops.lesionkit.selective_scan_2d(x, dt, A, B, C, D, dt_bias, bool(dt_softplus),
                                                 None if out_dtype == x.dtype else out_dtype)[0]
