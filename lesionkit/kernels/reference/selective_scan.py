"""Selective scan (Mamba S6) and the SS2D core, plain PyTorch (cross-scan / cross-merge are in
:mod:`lesionkit.kernels.reference.cross_scan`).

Recurrence (Mamba's S6 after zero-order-hold discretisation; docs/ops.md), with dt = softplus(delta + delta_bias) when `delta_softplus`:
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   y_t = <C_t, h_t> + D * u_t,   y *= silu(z).

Two references of the scan share one input check:
- :func:`selective_scan_sequential_reference` steps through l: the test oracle;
- :func:`selective_scan_reference` is the chunked parallel scan, the fallback and baseline: all
  chunks of T steps are scanned at once from a zero state (T vectorised steps), the chunk-end
  states are carried across the l / T chunks, and each position adds the carried state times
  exp(S_t), where S_t is the log-space segment sum of dt * A from the chunk start to t (at most
  1 for A < 0). Nothing is divided by exp(cumsum), which overflows on long sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lesionkit.kernels.accumulation import acc_dtype
from lesionkit.kernels.reference.cross_scan import (  # noqa: F401  (re-exported)
    DIRECTIONS,
    check_cross_merge_inputs,
    check_spatial_input,
    cross_merge_reference,
    cross_scan_reference,
    directions_to_sequences,
)

MAX_STATE = 256  # largest d_state (n) the kernels take


def _param_dtype_ok(param: torch.Tensor, u: torch.Tensor) -> bool:
    # State and parameters are float32; float64 inputs (gradcheck) take float64 throughout.
    return param.dtype == acc_dtype(u.dtype)


def check_selective_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> int:
    """Raise ValueError naming the argument for every input the scan cannot take; returns g."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} should be a tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise ValueError(f"u should be a (b, d, l) tensor, got shape {tuple(u.shape)}")
    if not u.dtype.is_floating_point:
        raise ValueError(f"u should be a floating tensor, got {u.dtype}")
    batch, dim, length = u.shape
    acc = acc_dtype(u.dtype)
    if delta.shape != u.shape:
        raise ValueError(f"delta should have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z should have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A should have shape (d, n) with d = {dim}, got {tuple(A.shape)}")
    n = A.shape[1]
    if not 1 <= n <= MAX_STATE:
        raise ValueError(f"A's n (d_state) should be in [1, {MAX_STATE}], got {n}")
    groups = None
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            g = 1
            ok = tuple(t.shape) == (batch, n, length)
        elif t.dim() == 4:
            g = t.shape[1]
            ok = tuple(t.shape) == (batch, g, n, length) and g > 0
        else:
            ok = False
        if not ok:
            raise ValueError(f"{name} should have shape (b, g, n, l) or (b, n, l) with b = {batch}, "
                             f"n = {n}, l = {length}, got {tuple(t.shape)}")
        if groups is not None and g != groups:
            raise ValueError(f"B and C should have the same number of groups, got {groups} and {g}")
        groups = g
    if dim % groups:
        raise ValueError(f"d should be divisible by the number of groups g, got d = {dim}, g = {groups}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} should have shape (d,) = ({dim},), got {tuple(t.shape)}")
    for name, t in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != u.dtype:
            raise ValueError(f"{name} should have u's dtype {u.dtype}, got {t.dtype}")
    for name, t in (("A", A), ("D", D), ("delta_bias", delta_bias)):
        if t is not None and not _param_dtype_ok(t, u):
            raise ValueError(f"{name} should be {acc} (state and parameters are {acc} for {u.dtype} "
                             f"inputs), got {t.dtype}")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} should be on u's device {u.device}, got {t.device}")
    return groups


def check_out_dtype(out_dtype, dtype: torch.dtype) -> torch.dtype:
    """The output dtype: the input's (None), or float32 for 16-bit inputs; ValueError otherwise."""
    if out_dtype is None:
        return dtype
    if out_dtype not in (dtype, acc_dtype(dtype)):
        raise ValueError(f"out_dtype should be None, {dtype} (the input dtype) or "
                         f"{acc_dtype(dtype)}, got {out_dtype}")
    return out_dtype


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """float32 (float64) views: dt (b, d, l), B and C as (b, g, n, l)."""
    acc = acc_dtype(u.dtype)
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    B = B.to(acc)
    C = C.to(acc)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    return dt, A.to(acc), B, C


def _finish(y, u, D, z, out_dtype=None):
    acc = y.dtype
    if D is not None:
        y = y + D.to(acc)[:, None] * u.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(out_dtype or u.dtype)


def selective_scan_sequential_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                        delta_softplus=False, return_last_state=False,
                                        out_dtype=None):
    """The recurrence stepped through l one position at a time: the test oracle."""
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = check_out_dtype(out_dtype, u.dtype)
    dt, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    per_group = dim // groups
    # Step-major copies, so that each step reads contiguous slices; channels of a group share
    # its B and C: dt, x (l, b, g, d/g, 1); B, C (l, b, g, 1, n).
    dt_s = dt.view(batch, groups, per_group, length).permute(3, 0, 1, 2).unsqueeze(-1).contiguous()
    x_s = (dt * u.to(dt.dtype)).view(batch, groups, per_group, length).permute(3, 0, 1, 2)
    x_s = x_s.unsqueeze(-1).contiguous()
    B_s = B.permute(3, 0, 1, 2).unsqueeze(3).contiguous()
    C_s = C.permute(3, 0, 1, 2).unsqueeze(3).contiguous()
    A_v = A.view(groups, per_group, n)
    h = u.new_zeros((batch, groups, per_group, n), dtype=dt.dtype)
    ys = []
    # unbind, not indexing per step: the backward of t-indexing writes a full-size gradient
    # for every step (quadratic in l); unbind's backward is one stack.
    for dt_t, x_t, B_t, C_t in zip(dt_s.unbind(0), x_s.unbind(0), B_s.unbind(0), C_s.unbind(0)):
        h = torch.exp(dt_t * A_v) * h + x_t * B_t
        ys.append((h * C_t).sum(-1))
    if ys:
        y = torch.stack(ys, dim=-1).reshape(batch, dim, length)
    else:
        y = u.new_zeros((batch, dim, 0), dtype=dt.dtype)
    out = _finish(y, u, D, z, out_dtype)
    return (out, h.reshape(batch, dim, n)) if return_last_state else out


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False, chunk_size=None,
                             out_dtype=None):
    """Chunked parallel scan; same arguments as selective_scan (`chunk_size` T ~ sqrt(l))."""
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = check_out_dtype(out_dtype, u.dtype)
    dt, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    if length == 0:  # nothing to scan: an empty output, the state stays at its zero start
        out = u * 0
        return (out, dt.new_zeros(batch, dim, n)) if return_last_state else out
    per_group = dim // groups
    T = chunk_size or max(8, int(length ** 0.5))
    chunks = -(-length // T)
    pad = chunks * T - length
    # Padding steps have dt = 0: decay exp(0) = 1 and no input, so the state passes unchanged.
    # Step-major layouts, so that step t of every chunk is one contiguous slice:
    # dt, x: (T, b, g, d/g, chunks); B, C: (T, b, g, 1, chunks, n).
    def steps(t):
        return (F.pad(t, (0, pad)).view(batch, groups, per_group, chunks, T)
                .permute(4, 0, 1, 2, 3).contiguous())

    dt_s = steps(dt)
    x_s = steps(dt * u.to(dt.dtype))
    B_s, C_s = (F.pad(t, (0, pad)).view(batch, groups, n, chunks, T).permute(4, 0, 1, 3, 2)
                .contiguous().unsqueeze(3) for t in (B, C))
    A_v = A.view(groups, per_group, 1, n)

    # Pass 1: every chunk scanned at once from a zero state.
    # Per-step slices by unbind (indexing step t would make the backward quadratic in T).
    dt_steps = dt_s.unsqueeze(-1).unbind(0)
    x_steps = x_s.unsqueeze(-1).unbind(0)
    B_steps, C_steps = B_s.unbind(0), C_s.unbind(0)
    h = dt.new_zeros((batch, groups, per_group, chunks, n))
    y_local = []
    for t in range(T):
        h = torch.exp(dt_steps[t] * A_v) * h + x_steps[t] * B_steps[t]
        y_local.append((h * C_steps[t]).sum(-1))
    # Log-decay of each whole chunk, then the state entering each chunk, carried chunk by chunk:
    # H_{c+1} = exp(S_c) H_c + h_c.
    chunk_decay = torch.exp((dt_s.sum(0)[..., None]) * A_v)
    carried = []
    state = dt.new_zeros((batch, groups, per_group, n))
    for decay_c, h_c in zip(chunk_decay.unbind(3), h.unbind(3)):
        carried.append(state)
        state = decay_c * state + h_c
    H = torch.stack(carried, dim=3)
    # Pass 2: the carried state decays by exp(S_t), S_t the log-space segment sum of dt * A from
    # the chunk start to t (at most 1 for A < 0).
    S = torch.zeros_like(H)
    ys = []
    for t in range(T):
        S = S + dt_steps[t] * A_v
        ys.append(y_local[t] + (torch.exp(S) * H * C_steps[t]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, chunks * T)[..., :length]
    out = _finish(y, u, D, z, out_dtype)
    return (out, state.reshape(batch, dim, n)) if return_last_state else out


def check_selective_scan_2d_inputs(x, dt, A, B, C, D, dt_bias) -> None:
    """Raise ValueError naming the argument for every input selective_scan_2d cannot take."""
    check_spatial_input("x", x)
    batch, dim, height, width = x.shape
    if not x.dtype.is_floating_point:
        raise ValueError(f"x should be a floating tensor, got {x.dtype}")
    k = DIRECTIONS
    if not isinstance(A, torch.Tensor) or A.dim() != 3 or A.shape[:2] != (k, dim):
        raise ValueError(f"A should have shape (4, D, N) with D = {dim}, got "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else A!r}")
    n = A.shape[2]
    if not 1 <= n <= MAX_STATE:
        raise ValueError(f"A's N (d_state) should be in [1, {MAX_STATE}], got {n}")
    expected = {"dt": (batch, k, dim, height, width), "B": (batch, k, n, height, width),
                "C": (batch, k, n, height, width), "D": (k, dim), "dt_bias": (k, dim)}
    acc = acc_dtype(x.dtype)
    for name, t in (("dt", dt), ("B", B), ("C", C), ("D", D), ("dt_bias", dt_bias)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected[name]:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else t
            raise ValueError(f"{name} should have shape {expected[name]}, got {got}")
    for name, t in (("dt", dt), ("B", B), ("C", C)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} should have x's dtype {x.dtype}, got {t.dtype}")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if t.dtype != acc:
            raise ValueError(f"{name} should be {acc} (state and parameters are {acc} for {x.dtype} "
                             f"inputs), got {t.dtype}")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("dt_bias", dt_bias)):
        if t.device != x.device:
            raise ValueError(f"{name} should be on x's device {x.device}, got {t.device}")


def selective_scan_2d_reference(x, dt, A, B, C, D, dt_bias, dt_softplus=True, sequential=False,
                                out_dtype=None):
    """SS2D core = cross_merge(selective_scan(cross_scan(x), ...)); `sequential` picks the oracle."""
    check_selective_scan_2d_inputs(x, dt, A, B, C, D, dt_bias)
    out_dtype = check_out_dtype(out_dtype, x.dtype)
    batch, dim, height, width = x.shape
    k, n = DIRECTIONS, A.shape[2]
    xs = cross_scan_reference(x).reshape(batch, k * dim, height * width)
    dts = directions_to_sequences(dt).reshape(batch, k * dim, height * width)
    Bs = directions_to_sequences(B)
    Cs = directions_to_sequences(C)
    scan = selective_scan_sequential_reference if sequential else selective_scan_reference
    # The four directions are summed in float32 (as the kernels do) and rounded once.
    ys = scan(xs, dts, A.reshape(k * dim, n), Bs, Cs, D.reshape(-1), None, dt_bias.reshape(-1),
              dt_softplus, out_dtype=acc_dtype(x.dtype))
    return cross_merge_reference(ys.view(batch, k, dim, height * width), height,
                                 width).to(out_dtype)
