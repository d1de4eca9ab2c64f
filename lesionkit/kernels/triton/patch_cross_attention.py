"""Triton kernels of the patch cross-attention (GRCSF Eq. 6).

One program per (batch, head, window) on grid axis 0, so any number of windows fits. A program
loads its window's q, k, v as (tokens, channels) tiles straight from the NCHW layout (token t
of the window is pixel (t // P, t % P)), does the window's softmax attention with tl.dot in the
accumulation type and stores the output and the per-query log-sum-exp in place. The backward
recomputes the probabilities from the log-sum-exp. Registered as
``lesionkit::patch_cross_attention_triton`` (+ ``_backward_triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lesionkit.kernels.triton.accumulation import acc_types


@triton.jit
def _window_pixels(pid, n_windows, cols, W, P: tl.constexpr, BLOCK_T: tl.constexpr):
    """(batch * head) plane of program `pid`, the in-plane offsets of its window's tokens and
    which of the BLOCK_T token slots are real."""
    plane = pid // n_windows
    w = pid % n_windows
    origin = (w // cols) * P * W + (w % cols) * P
    t = tl.arange(0, BLOCK_T)
    return plane, origin + (t // P) * W + t % P, t < P * P


@triton.jit
def _tile(plane, C, HW, pix, tokens, BLOCK_D: tl.constexpr):
    """Offsets (BLOCK_T, BLOCK_D) of a (tokens, channels) tile and its in-bounds mask."""
    d = tl.arange(0, BLOCK_D)
    offs = plane * C * HW + d[None, :] * HW + pix[:, None]
    return offs, tokens[:, None] & (d[None, :] < C)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, DK, DV, HW, W, n_windows, cols, scale,
                    P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr,
                    BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    plane, pix, tokens = _window_pixels(pid, n_windows, cols, W, P, BLOCK_T)
    qk_offs, qk_mask = _tile(plane, DK, HW, pix, tokens, BLOCK_DK)
    v_offs, v_mask = _tile(plane, DV, HW, pix, tokens, BLOCK_DV)
    q = tl.load(q_ptr + qk_offs, mask=qk_mask, other=0).to(ACC)
    k = tl.load(k_ptr + qk_offs, mask=qk_mask, other=0).to(ACC)
    v = tl.load(v_ptr + v_offs, mask=v_mask, other=0).to(ACC)
    s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC) * scale
    s = tl.where(tokens[None, :], s, float("-inf"))  # padded key slots get no weight
    m = tl.max(s, axis=1)
    e = tl.exp(s - m[:, None])
    denom = tl.sum(e, axis=1)
    out = tl.dot(e / denom[:, None], v, input_precision="ieee", out_dtype=ACC)
    tl.store(out_ptr + v_offs, out.to(out_ptr.dtype.element_ty), mask=v_mask)
    tl.store(lse_ptr + plane * HW + pix, m + tl.log(denom), mask=tokens)


@triton.jit
def _backward_kernel(grad_ptr, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
                     DK, DV, HW, W, n_windows, cols, scale,
                     P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr,
                     BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    plane, pix, tokens = _window_pixels(pid, n_windows, cols, W, P, BLOCK_T)
    qk_offs, qk_mask = _tile(plane, DK, HW, pix, tokens, BLOCK_DK)
    v_offs, v_mask = _tile(plane, DV, HW, pix, tokens, BLOCK_DV)
    q = tl.load(q_ptr + qk_offs, mask=qk_mask, other=0).to(ACC)
    k = tl.load(k_ptr + qk_offs, mask=qk_mask, other=0).to(ACC)
    v = tl.load(v_ptr + v_offs, mask=v_mask, other=0).to(ACC)
    do = tl.load(grad_ptr + v_offs, mask=v_mask, other=0).to(ACC)
    o = tl.load(out_ptr + v_offs, mask=v_mask, other=0).to(ACC)
    lse = tl.load(lse_ptr + plane * HW + pix, mask=tokens, other=0)
    rowterm = tl.sum(do * o, axis=1)  # D_i = dO_i . O_i
    s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC) * scale
    p = tl.exp(s - lse[:, None])
    p = tl.where(tokens[:, None] & tokens[None, :], p, 0.0)
    dv = tl.dot(tl.trans(p), do, input_precision="ieee", out_dtype=ACC)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=ACC)
    ds = p * (dp - rowterm[:, None]) * scale
    dq = tl.dot(ds, k, input_precision="ieee", out_dtype=ACC)
    dk = tl.dot(tl.trans(ds), q, input_precision="ieee", out_dtype=ACC)
    tl.store(dq_ptr + qk_offs, dq.to(dq_ptr.dtype.element_ty), mask=qk_mask)
    tl.store(dk_ptr + qk_offs, dk.to(dk_ptr.dtype.element_ty), mask=qk_mask)
    tl.store(dv_ptr + v_offs, dv.to(dv_ptr.dtype.element_ty), mask=v_mask)


def _blocks(patch_size: int, dk: int, dv: int) -> dict:
    # tl.dot wants every dimension >= 16 and a power of two.
    block_t = max(16, triton.next_power_of_2(patch_size * patch_size))
    # A (T x T) fp32 tile per program: more warps to hold it once T reaches 256 (P = 16).
    return dict(P=patch_size, BLOCK_T=block_t, BLOCK_DK=max(16, triton.next_power_of_2(dk)),
                BLOCK_DV=max(16, triton.next_power_of_2(dv)), num_warps=8 if block_t >= 256 else 4)


@triton_op("lesionkit::patch_cross_attention_triton", mutates_args=())
def patch_cross_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patch_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, dk, height, width = q.shape
    dv = v.shape[2]
    cols = width // patch_size
    n_windows = (height // patch_size) * cols
    acc_torch, acc_tl = acc_types(q.dtype)
    out = torch.empty((batch, heads, dv, height, width), dtype=v.dtype, device=v.device)
    lse = torch.empty((batch, heads, height, width), dtype=acc_torch, device=q.device)
    if batch * heads == 0:
        return out, lse
    wrap_triton(_forward_kernel)[(batch * heads * n_windows,)](
        q, k, v, out, lse, dk, dv, height * width, width, n_windows, cols, scale,
        ACC=acc_tl, **_blocks(patch_size, dk, dv))
    return out, lse


@triton_op("lesionkit::patch_cross_attention_backward_triton", mutates_args=())
def patch_cross_attention_backward_triton(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, patch_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    batch, heads, dk, height, width = q.shape
    dv_channels = v.shape[2]
    cols = width // patch_size
    n_windows = (height // patch_size) * cols
    _, acc_tl = acc_types(q.dtype)
    dq, dk_, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if batch * heads == 0:
        return dq, dk_, dv
    wrap_triton(_backward_kernel)[(batch * heads * n_windows,)](
        grad_out, q, k, v, out, lse, dq, dk_, dv, dk, dv_channels, height * width, width,
        n_windows, cols, scale, ACC=acc_tl, **_blocks(patch_size, dk, dv_channels))
    return dq, dk_, dv
