"""Triton kernels of VMamba's cross-scan and its adjoint cross-merge (docs/ops.md).

One program per (image, channel, block of pixels). cross_scan reads each pixel once and writes
it to its four sequence positions (row-major t = p, column-major t = w * H + h, and both
reversed); cross_merge gathers the four entries of each pixel and writes their sum once, so
neither needs atomics. Registered as ``lesionkit::cross_scan_triton`` and
``lesionkit::cross_merge_triton``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_BLOCK = 1024


@triton.jit
def _cross_scan_kernel(x_ptr, out_ptr, C, H, W, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # b * C + c
    b = plane // C
    c = plane % C
    L = H * W
    p = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = p < L
    v = tl.load(x_ptr + plane * L + p, mask=inside)
    t_col = (p % W) * H + p // W  # pixel (h, w) is step w * H + h of the column-major scan
    base = (b * 4 * C + c) * L
    tl.store(out_ptr + base + p, v, mask=inside)
    tl.store(out_ptr + base + C * L + t_col, v, mask=inside)
    tl.store(out_ptr + base + 2 * C * L + (L - 1 - p), v, mask=inside)
    tl.store(out_ptr + base + 3 * C * L + (L - 1 - t_col), v, mask=inside)


@triton.jit
def _cross_merge_kernel(y_ptr, out_ptr, C, H, W, BLOCK: tl.constexpr, ACC: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    b = plane // C
    c = plane % C
    L = H * W
    p = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = p < L
    t_col = (p % W) * H + p // W
    base = (b * 4 * C + c) * L
    acc = tl.load(y_ptr + base + p, mask=inside, other=0).to(ACC)
    acc += tl.load(y_ptr + base + C * L + t_col, mask=inside, other=0).to(ACC)
    acc += tl.load(y_ptr + base + 2 * C * L + (L - 1 - p), mask=inside, other=0).to(ACC)
    acc += tl.load(y_ptr + base + 3 * C * L + (L - 1 - t_col), mask=inside, other=0).to(ACC)
    tl.store(out_ptr + plane * L + p, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton_op("lesionkit::cross_scan_triton", mutates_args=())
def cross_scan_triton(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    batch, channels, height, width = x.shape
    length = height * width
    out = x.new_empty((batch, 4, channels, length))
    if out.numel() == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(length))
    grid = (batch * channels, triton.cdiv(length, block))
    wrap_triton(_cross_scan_kernel)[grid](x, out, channels, height, width, BLOCK=block)
    return out


@triton_op("lesionkit::cross_merge_triton", mutates_args=())
def cross_merge_triton(y: torch.Tensor, H: int, W: int) -> torch.Tensor:
    y = y.contiguous()
    batch, _, channels, length = y.shape
    out = y.new_empty((batch, channels, H, W))
    if out.numel() == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(length))
    grid = (batch * channels, triton.cdiv(length, block))
    acc = tl.float64 if y.dtype == torch.float64 else tl.float32
    wrap_triton(_cross_merge_kernel)[grid](y, out, channels, H, W, BLOCK=block, ACC=acc)
    return out
