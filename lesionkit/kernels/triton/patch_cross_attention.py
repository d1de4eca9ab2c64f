"""Triton kernels of the patch cross-attention (GRCSF Eq. 6), tiled over the window.

A window of P x P pixels has T = P*P tokens (token t is pixel (t // P, t % P) of the window).
Tiles of BLOCK_M queries and BLOCK_N keys are read straight from the NCHW layout, so the
(T x T) score matrix never exists whole: at P = 16 it alone would be 256 KB of fp32, more
shared memory than an H200 gives one program (227 KB). The block sizes come from
:func:`block_sizes`, a shared-memory model checked against the device's budget.

- forward: one program per (batch * head, window, query block), all on grid axis 0; an online
  softmax over the key blocks (flash-attention); stores the output and the per-query
  log-sum-exp.
- backward (recomputes the probabilities from the log-sum-exp, docs/patch_cross_attention.md):
  one program per key block accumulates dk and dv over the query blocks, one per query block
  accumulates dq over the key blocks; no atomics. D_i = dO_i . O_i is recomputed per tile.

``scale`` reaches the kernels as a one-element tensor of the accumulation dtype: Triton types a
Python float fp32 on a GPU, which would cost float64 results 7 digits. Launches run under the
tensors' device. Registered as ``lesionkit::patch_cross_attention_triton`` (+ ``_backward_triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lesionkit.kernels.triton.accumulation import acc_types
from lesionkit.kernels.triton.launch import on_device, shared_memory_budget

_MIN_DOT = 16  # tl.dot wants every dimension a power of two >= 16
_TILES = ((64, 64), (64, 32), (32, 32), (32, 16), (16, 16))  # (BLOCK_M, BLOCK_N), largest first


def _pow2(n: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(n))


def shared_bytes(block_m: int, block_n: int, block_dk: int, block_dv: int, elem_bytes: int,
                 stages: int) -> int:
    """Shared memory (bytes) the largest of the three kernels may use with these blocks.

    The model counts every ``tl.dot`` operand tile as staged in shared memory, the tiles that are
    streamed through a loop once per pipeline stage, and one (BLOCK_M x BLOCK_N) probability
    tile per product that takes it as an operand:
      forward: q resident, k and v streamed, p;
      dk/dv:   k and v resident, q, dO and O streamed, p and dS;
      dq:      q, dO and O resident, k and v streamed, dS.
    """
    m, n = block_m, block_n
    forward = m * block_dk + stages * n * (block_dk + block_dv) + m * n
    key_side = n * (block_dk + block_dv) + stages * m * (block_dk + 2 * block_dv) + 2 * m * n
    query_side = m * (block_dk + 2 * block_dv) + stages * n * (block_dk + block_dv) + m * n
    return elem_bytes * max(forward, key_side, query_side)


def block_sizes(patch_size: int, dk: int, dv: int, elem_bytes: int, budget: int) -> dict:
    """Block sizes and launch options for windows of ``patch_size`` and dk / dv channels whose
    tiles take ``elem_bytes`` (4 for fp32 accumulation, 8 for fp64) within ``budget`` bytes of
    shared memory per program.

    The largest (BLOCK_M, BLOCK_N) of ``_TILES`` (no larger than the window) and the most
    pipeline stages (2, then 1) that fit :func:`shared_bytes`; float64 tiles stop at 32 x 32 so
    the (M x N) accumulators stay in registers. Raises ValueError when not even 16 x 16 fits.
    """
    tokens = patch_size * patch_size
    block_dk, block_dv = _pow2(dk), _pow2(dv)
    cap = _pow2(tokens)
    if elem_bytes >= 8:
        cap = min(cap, 32)
    for block_m, block_n in _TILES:
        if block_m > cap or block_n > cap:
            continue
        for stages in (2, 1):
            if shared_bytes(block_m, block_n, block_dk, block_dv, elem_bytes, stages) <= budget:
                return dict(P=patch_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=block_dk,
                            BLOCK_DV=block_dv, num_warps=4, num_stages=stages)
    need = shared_bytes(16, 16, block_dk, block_dv, elem_bytes, 1)
    raise ValueError(f"patch_cross_attention (triton): dk={dk}, dv={dv} need {need} bytes of shared "
                     f"memory per program even with 16 x 16 tiles, more than this device's {budget}; "
                     "use more heads (fewer channels per head) or the cuda / reference backend")


@triton.jit
def _pixels(w, cols, W, t, P: tl.constexpr):
    """In-plane offsets (int64) of tokens `t` of window `w`."""
    return (w // cols) * P * W + (w % cols) * P + (t // P) * W + t % P


@triton.jit
def _split(pid, n_windows, blocks):
    """(plane, window, block) of program `pid` (int64): blocks fastest, then windows."""
    rest = pid // blocks
    return rest // n_windows, rest % n_windows, pid % blocks


@triton.jit
def _load(ptr, plane, C, HW, pix, valid, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """(tokens, BLOCK_D) tile of channel plane `plane` of a (planes, C, H, W) tensor."""
    d = tl.arange(0, BLOCK_D).to(tl.int64)  # d * HW passes 2**31 on large maps
    offs = plane * C * HW + d[None, :] * HW + pix[:, None]
    mask = valid[:, None] & (d[None, :] < C)
    return tl.load(ptr + offs, mask=mask, other=0).to(ACC), offs, mask


@triton.jit
def _tile(ptr, plane, C, HW, pix, valid, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """The tile of :func:`_load` alone. Kernels must not unpack unused results into `_`: a name
    assigned before a loop and again inside it is loop-carried, and the compiler (not the
    interpreter) rejects it when the tile shapes differ."""
    tile, _offs, _mask = _load(ptr, plane, C, HW, pix, valid, BLOCK_D, ACC)
    return tile


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, scale_ptr, DK, DV, HW, W, n_windows,
                    cols, m_blocks, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    T: tl.constexpr = P * P
    pid = tl.program_id(0).to(tl.int64)
    plane, w, mb = _split(pid, n_windows, m_blocks)
    scale = tl.load(scale_ptr)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rvalid = rows < T
    rpix = _pixels(w, cols, W, rows, P)
    q = _tile(q_ptr, plane, DK, HW, rpix, rvalid, BLOCK_DK, ACC)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC)
    for n0 in range(0, T, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        cvalid = keys < T
        cpix = _pixels(w, cols, W, keys, P)
        k = _tile(k_ptr, plane, DK, HW, cpix, cvalid, BLOCK_DK, ACC)
        v = _tile(v_ptr, plane, DV, HW, cpix, cvalid, BLOCK_DV, ACC)
        s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC) * scale
        s = tl.where(cvalid[None, :], s, float("-inf"))  # padded key slots get no weight
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is in the first block
        alpha = tl.exp(m_i - m_new)  # 0 on the first block (m_i = -inf)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee", out_dtype=ACC)
        m_i = m_new
    dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    out_offs = plane * DV * HW + dv[None, :] * HW + rpix[:, None]
    out_mask = rvalid[:, None] & (dv[None, :] < DV)
    tl.store(out_ptr + out_offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(lse_ptr + plane * HW + rpix, m_i + tl.log(l_i), mask=rvalid)


@triton.jit
def _query_tile(grad_ptr, q_ptr, out_ptr, lse_ptr, plane, w, DK, DV, HW, W, cols, rows,
                P: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    """q, dO, lse and D = rowsum(dO * O) of query tokens `rows`, their validity and q's offsets."""
    rvalid = rows < P * P
    rpix = _pixels(w, cols, W, rows, P)
    q, q_offs, q_mask = _load(q_ptr, plane, DK, HW, rpix, rvalid, BLOCK_DK, ACC)
    do = _tile(grad_ptr, plane, DV, HW, rpix, rvalid, BLOCK_DV, ACC)
    o = _tile(out_ptr, plane, DV, HW, rpix, rvalid, BLOCK_DV, ACC)
    lse = tl.load(lse_ptr + plane * HW + rpix, mask=rvalid, other=0)
    return q, do, lse, tl.sum(do * o, axis=1), rvalid, q_offs, q_mask


@triton.jit
def _backward_key_kernel(grad_ptr, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, dk_ptr, dv_ptr,
                         scale_ptr, DK, DV, HW, W, n_windows, cols, n_blocks, P: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                         BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    """dv_j = sum_i P_ij dO_i, dk_j = scale sum_i dS_ij q_i for one block of keys j."""
    T: tl.constexpr = P * P
    pid = tl.program_id(0).to(tl.int64)
    plane, w, nb = _split(pid, n_windows, n_blocks)
    scale = tl.load(scale_ptr)
    keys = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    cvalid = keys < T
    cpix = _pixels(w, cols, W, keys, P)
    k, k_offs, k_mask = _load(k_ptr, plane, DK, HW, cpix, cvalid, BLOCK_DK, ACC)
    v, v_offs, v_mask = _load(v_ptr, plane, DV, HW, cpix, cvalid, BLOCK_DV, ACC)
    dk = tl.zeros((BLOCK_N, BLOCK_DK), ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    for m0 in range(0, T, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q, do, lse, rowterm, rvalid, _q_offs, _q_mask = _query_tile(
            grad_ptr, q_ptr, out_ptr, lse_ptr, plane, w, DK, DV, HW, W, cols, rows, P, BLOCK_DK,
            BLOCK_DV, ACC)
        s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC) * scale
        p = tl.where(rvalid[:, None] & cvalid[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p), do, input_precision="ieee", out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=ACC)
        ds = p * (dp - rowterm[:, None])
        dk += tl.dot(tl.trans(ds), q, input_precision="ieee", out_dtype=ACC)
    tl.store(dk_ptr + k_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dv_ptr + v_offs, dv.to(dv_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def _backward_query_kernel(grad_ptr, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, dq_ptr, scale_ptr,
                           DK, DV, HW, W, n_windows, cols, m_blocks, P: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                           BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    """dq_i = scale sum_j dS_ij k_j for one block of queries i."""
    T: tl.constexpr = P * P
    pid = tl.program_id(0).to(tl.int64)
    plane, w, mb = _split(pid, n_windows, m_blocks)
    scale = tl.load(scale_ptr)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    q, do, lse, rowterm, rvalid, q_offs, q_mask = _query_tile(
        grad_ptr, q_ptr, out_ptr, lse_ptr, plane, w, DK, DV, HW, W, cols, rows, P, BLOCK_DK, BLOCK_DV, ACC)
    dq = tl.zeros((BLOCK_M, BLOCK_DK), ACC)
    for n0 in range(0, T, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        cvalid = keys < T
        cpix = _pixels(w, cols, W, keys, P)
        k = _tile(k_ptr, plane, DK, HW, cpix, cvalid, BLOCK_DK, ACC)
        v = _tile(v_ptr, plane, DV, HW, cpix, cvalid, BLOCK_DV, ACC)
        s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC) * scale
        p = tl.where(rvalid[:, None] & cvalid[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=ACC)
        dq += tl.dot(p * (dp - rowterm[:, None]), k, input_precision="ieee", out_dtype=ACC)
    tl.store(dq_ptr + q_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


_MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0


def _launch_config(q: torch.Tensor, patch_size: int, dk: int, dv: int, acc: torch.dtype) -> dict:
    elem = torch.empty((), dtype=acc).element_size()
    return block_sizes(patch_size, dk, dv, elem, shared_memory_budget(q.device))


def _grid(programs: int) -> tuple[int]:
    if programs > _MAX_GRID_X:
        raise ValueError(f"patch_cross_attention (triton) needs {programs} programs, more than a CUDA grid "
                         f"holds ({_MAX_GRID_X}); split the batch")
    return (programs,)


def _scale_arg(scale: float, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    # A tensor, not a Python float: Triton would type the float fp32 on a GPU.
    return torch.full((1,), scale, dtype=acc, device=device)


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
    config = _launch_config(q, patch_size, dk, dv, acc_torch)
    m_blocks = triton.cdiv(patch_size * patch_size, config["BLOCK_M"])
    with on_device(q):
        wrap_triton(_forward_kernel)[_grid(batch * heads * n_windows * m_blocks)](
            q, k, v, out, lse, _scale_arg(scale, acc_torch, q.device), dk, dv, height * width, width,
            n_windows, cols, m_blocks, ACC=acc_tl, **config)
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
    acc_torch, acc_tl = acc_types(q.dtype)
    dq, dk_, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if batch * heads == 0:
        return dq, dk_, dv
    config = _launch_config(q, patch_size, dk, dv_channels, acc_torch)
    tokens = patch_size * patch_size
    m_blocks, n_blocks = triton.cdiv(tokens, config["BLOCK_M"]), triton.cdiv(tokens, config["BLOCK_N"])
    planes = batch * heads * n_windows
    scale_t = _scale_arg(scale, acc_torch, q.device)
    common = (dk, dv_channels, height * width, width, n_windows, cols)
    with on_device(q):
        wrap_triton(_backward_key_kernel)[_grid(planes * n_blocks)](
            grad_out, q, k, v, out, lse, dk_, dv, scale_t, *common, n_blocks, ACC=acc_tl, **config)
        wrap_triton(_backward_query_kernel)[_grid(planes * m_blocks)](
            grad_out, q, k, v, out, lse, dq, scale_t, *common, m_blocks, ACC=acc_tl, **config)
    return dq, dk_, dv
