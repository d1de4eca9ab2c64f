"""Public API of VMamba's cross-scan and its adjoint cross-merge (docs/ss2d.md).

Each function validates its input, picks a backend (see :mod:`lesionkit.kernels.backend`) and
calls ``torch.ops.lesionkit.*`` (cpu, cuda), the Triton op (triton) or the pure-PyTorch
reference. Fake and autograd registrations of the compiled and Triton ops live here; each op's
backward is the other (they are adjoints).
"""

from __future__ import annotations

import torch

from lesionkit.kernels import _library
from lesionkit.kernels.backend import OpSpec, lazy_triton_module, register_op, select_backend
from lesionkit.kernels.reference.cross_scan import (
    DIRECTIONS,
    check_cross_merge_inputs,
    check_spatial_input,
    cross_merge_reference,
    cross_scan_reference,
)

# auto on a GPU: the order the first H200 run measured, forward + backward (README "GPU, first
# run"): PyTorch's strided copies beat both cross_scan kernels (0.80 ms against 1.17), the CUDA
# cross_merge beats the reference (1.01 against 1.77).
CROSS_SCAN = register_op(OpSpec("cross_scan", auto_gpu_order=("reference", "cuda", "triton")))
CROSS_MERGE = register_op(OpSpec("cross_merge", auto_gpu_order=("cuda", "triton", "reference")))


if _library.HAS_OPS:

    @torch.library.register_fake("lesionkit::cross_scan")
    def _(x):
        batch, channels, height, width = x.shape
        return x.new_empty((batch, DIRECTIONS, channels, height * width))

    @torch.library.register_fake("lesionkit::cross_merge")
    def _(y, H, W):
        return y.new_empty((y.shape[0], y.shape[2], H, W))

    def _cross_scan_setup(ctx, inputs, output):
        ctx.height, ctx.width = inputs[0].shape[-2:]

    def _cross_merge_setup(ctx, inputs, output):
        pass

    # cross_merge is cross_scan's adjoint: each one's backward is the other.
    torch.library.register_autograd(
        "lesionkit::cross_scan",
        lambda ctx, grad: torch.ops.lesionkit.cross_merge(grad, ctx.height, ctx.width),
        setup_context=_cross_scan_setup)
    torch.library.register_autograd(
        "lesionkit::cross_merge",
        lambda ctx, grad: (torch.ops.lesionkit.cross_scan(grad), None, None),
        setup_context=_cross_merge_setup)


def _register_triton_autograd(triton_impl) -> None:
    def setup(ctx, inputs, output):
        ctx.height, ctx.width = inputs[0].shape[-2:]

    torch.library.register_autograd(
        "lesionkit::cross_scan_triton",
        lambda ctx, grad: triton_impl.cross_merge_triton(grad, ctx.height, ctx.width),
        setup_context=setup)
    torch.library.register_autograd(
        "lesionkit::cross_merge_triton",
        lambda ctx, grad: (triton_impl.cross_scan_triton(grad), None, None),
        setup_context=lambda ctx, inputs, output: None)


_triton_ops = lazy_triton_module("cross_scan", _register_triton_autograd)


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """VMamba's cross-scan: (B, C, H, W) -> (B, 4, C, H*W).

    Direction 0 reads row-major (h, w), 1 column-major (w, h), 2 and 3 are 0 and 1 reversed.
    """
    check_spatial_input("x", x)
    backend = select_backend(CROSS_SCAN.name, x.device)
    if backend == "reference":
        return cross_scan_reference(x)
    if backend == "triton":
        return _triton_ops().cross_scan_triton(x)
    return torch.ops.lesionkit.cross_scan(x)


def cross_merge(y: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Adjoint of :func:`cross_scan`: (B, 4, C, H*W) -> (B, C, H, W), the four summed."""
    check_cross_merge_inputs(y, H, W)
    backend = select_backend(CROSS_MERGE.name, y.device)
    if backend == "reference":
        return cross_merge_reference(y, H, W)
    if backend == "triton":
        return _triton_ops().cross_merge_triton(y, H, W)
    return torch.ops.lesionkit.cross_merge(y, H, W)
