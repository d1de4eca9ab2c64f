"""Triton kernels of VMamba's cross-scan and its adjoint cross-merge (docs/ops.md).

One program per (image, channel, block of pixels), all on grid axis 0 (:func:`launch_grid`),
offsets in int64, launched under the tensors' device. cross_scan reads each pixel once and writes
it to its four sequence positions (row-major t = p, column-major t = w * H + h, and both
reversed); cross_merge gathers the four entries of each pixel and writes their sum once, so
neither needs atomics. Registered as ``lesionkit::cross_scan_triton`` and
``lesionkit::cross_merge_triton``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lesionkit.kernels.reference.cross_scan import check_cross_merge_inputs, check_spatial_input

_BLOCK = 1024
_MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1 and 2 stop at 65,535)


def launch_grid(planes: int, length: int) -> tuple[tuple[int], int, int]:
    """``(grid, block, blocks_per_plane)`` for ``planes`` (batch * channels) planes of
    ``length`` (H * W) pixels.

    All programs go on grid axis 0: (plane, pixel block) flattened. Axis 1 would cap the pixel
    blocks at 65,535 (H * W at 67M) and batch * channels can pass that too (32 x 3072 in VM-UNet
    stage 4 training), so neither gets an axis of its own.
    """
    block = min(_BLOCK, triton.next_power_of_2(max(length, 1)))
    blocks_per_plane = triton.cdiv(length, block)
    programs = planes * blocks_per_plane
    if programs > _MAX_GRID_X:
        raise ValueError(f"cross-scan of {planes} planes of {length} pixels needs {programs} programs, more than "
                         f"a CUDA grid holds ({_MAX_GRID_X}); split the batch")
    return (programs,), block, blocks_per_plane


@triton.jit
def _plane_layout(C, H, W, blocks_per_plane, BLOCK: tl.constexpr):
    """This program's plane (b * C + c), image b, channel c, pixels p (int64), the plane length
    L and the direction stride C * L, all in int64 so that 3 * C * L cannot overflow."""
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // blocks_per_plane
    L = tl.cast(H, tl.int64) * W
    p = (pid % blocks_per_plane) * BLOCK + tl.arange(0, BLOCK)
    return plane, plane // C, plane % C, p, L, L * C


@triton.jit
def _cross_scan_kernel(x_ptr, out_ptr, C, H, W, blocks_per_plane, BLOCK: tl.constexpr):
    plane, b, c, p, L, CL = _plane_layout(C, H, W, blocks_per_plane, BLOCK)
    inside = p < L
    v = tl.load(x_ptr + plane * L + p, mask=inside)
    t_col = (p % W) * H + p // W  # pixel (h, w) is step w * H + h of the column-major scan
    base = (b * 4 * C + c) * L
    tl.store(out_ptr + base + p, v, mask=inside)
    tl.store(out_ptr + base + CL + t_col, v, mask=inside)
    tl.store(out_ptr + base + 2 * CL + (L - 1 - p), v, mask=inside)
    tl.store(out_ptr + base + 3 * CL + (L - 1 - t_col), v, mask=inside)


@triton.jit
def _cross_merge_kernel(y_ptr, out_ptr, C, H, W, blocks_per_plane, BLOCK: tl.constexpr, ACC: tl.constexpr):
    plane, b, c, p, L, CL = _plane_layout(C, H, W, blocks_per_plane, BLOCK)
    inside = p < L
    t_col = (p % W) * H + p // W
    base = (b * 4 * C + c) * L
    acc = tl.load(y_ptr + base + p, mask=inside, other=0).to(ACC)
    acc += tl.load(y_ptr + base + CL + t_col, mask=inside, other=0).to(ACC)
    acc += tl.load(y_ptr + base + 2 * CL + (L - 1 - p), mask=inside, other=0).to(ACC)
    acc += tl.load(y_ptr + base + 3 * CL + (L - 1 - t_col), mask=inside, other=0).to(ACC)
    tl.store(out_ptr + plane * L + p, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _on_device(t: torch.Tensor):
    """Launch under `t`'s CUDA device (current device and stream); nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton_op("lesionkit::cross_scan_triton", mutates_args=())
def cross_scan_triton(x: torch.Tensor) -> torch.Tensor:
    check_spatial_input("x", x)
    x = x.contiguous()
    batch, channels, height, width = x.shape
    length = height * width
    out = x.new_empty((batch, 4, channels, length))
    if out.numel() == 0:
        return out
    grid, block, per_plane = launch_grid(batch * channels, length)
    with _on_device(x):
        wrap_triton(_cross_scan_kernel)[grid](x, out, channels, height, width, per_plane, BLOCK=block)
    return out


@triton_op("lesionkit::cross_merge_triton", mutates_args=())
def cross_merge_triton(y: torch.Tensor, H: int, W: int) -> torch.Tensor:
    # A direct torch.ops call must not trust y's last dimension to be H * W (it would read
    # out of bounds); the checks are the Python wrapper's.
    check_cross_merge_inputs(y, H, W)
    y = y.contiguous()
    batch, _, channels, length = y.shape
    out = y.new_empty((batch, channels, H, W))
    if out.numel() == 0:
        return out
    grid, block, per_plane = launch_grid(batch * channels, length)
    acc = tl.float64 if y.dtype == torch.float64 else tl.float32
    with _on_device(y):
        wrap_triton(_cross_merge_kernel)[grid](y, out, channels, H, W, per_plane, BLOCK=block, ACC=acc)
    return out
