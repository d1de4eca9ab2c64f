"""The selective scan and the SS2D core as a fixed graph of plain tensor ops, for export (docs/ops.md).

The recurrence h_t = a_t * h_{t-1} + b_t, with a_t = exp(dt_t * A) and b_t = dt_t * B_t * u_t
(docs/ops.md, ``selective_scan``), is a first-order linear recurrence, and the pairs (a, b)
compose associatively: applying (a1, b1) then (a2, b2) is (a1 * a2, a2 * b1 + b2).

This module scans in two levels, with no Python loop over the sequence length:

1. The sequence is cut into chunks of ``chunk_size`` T steps (the tail padded with dt = 0: decay
   1, no input). All chunks are scanned at once from a zero state, step by step: T - 1 updates
   h = a_t * h + b_t, each on one (b, d, chunks, n) slice, unrolled in the graph. The decay from
   the chunk start to step t is exp(A * (dt summed over the chunk's steps up to t)).
2. The chunk-end (decay, state) pairs are composed across the chunks by a parallel prefix scan
   (Hillis-Steele, :func:`prefix_scan`: after the round with shift s, position c holds the
   composition of the 2s chunks ending at c, so ceil(log2(l / T)) rounds), which gives the
   state entering each chunk; each step adds it times its decay from the chunk start.

So the graph grows with T + log2(l / T), not with l, and the states (b, d, n, l) are written a
fixed few times, not in each of the log2(T) rounds of a prefix scan within the chunks, which is
how this module scanned before (ONNX Runtime ran the 256 px ``vmunet_tiny`` that way 1.45-2.5x
slower; docs/ops.md, "Export"). Only exp(x) with x <= 0 (A < 0, dt >= 0) is ever taken, and
nothing is divided by a decay or subtracted from a cumulative sum, so nothing overflows on long
sequences or for large |A| * dt: a decay too small for float32 becomes zero, as in the recurrence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lesionkit.kernels.accumulation import acc_dtype
from lesionkit.kernels.reference.cross_scan import (
    DIRECTIONS,
    cross_merge_reference,
    cross_scan_reference,
    directions_to_sequences,
)
from lesionkit.kernels.reference.selective_scan import (
    _finish,
    _prepare,
    check_out_dtype,
    check_selective_scan_2d_inputs,
    check_selective_scan_inputs,
)

DEFAULT_CHUNK = 16  # steps per chunk; docs/ops.md ("Export") has the measurement behind it


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size should be a positive int, got {chunk_size!r}")
    return chunk_size


def _shifted(t: torch.Tensor, shift: int, fill: float) -> torch.Tensor:
    """t moved ``shift`` steps later along the last dimension, the first ``shift`` set to ``fill``."""
    return F.pad(t[..., :-shift], (shift, 0), value=fill)


def _steps_first(t: torch.Tensor, shape: tuple[int, ...], chunks: int, T: int, pad: int) -> torch.Tensor:
    """(b, ..., l) holding prod(shape) sequences -> (T, b, *shape[:-1], chunks, shape[-1]): padded
    to chunks * T steps, the step within a chunk first. The transpose runs on this small tensor,
    before any broadcast with the states; the flat reshape keeps ONNX Runtime's optimizer from
    moving it past those broadcasts onto the states."""
    batch, rest = t.shape[0], math.prod(shape)
    t = F.pad(t, (0, pad)).reshape(batch, rest, chunks, T).permute(3, 0, 1, 2).reshape(T, batch, rest * chunks)
    return t.view(T, batch, *shape, chunks).transpose(-1, -2)


def prefix_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along the last dimension.

    Returns (the product of a from the start to t, h_t), both of b's shape, in
    ceil(log2(length)) Hillis-Steele rounds.
    """
    shift = 1
    while shift < b.shape[-1]:
        # Compose each step with the one `shift` earlier (identity (1, 0) before the start); b
        # first, as it needs the decay before this round.
        b = b + a * _shifted(b, shift, 0.0)
        a = a * _shifted(a, shift, 1.0)
        shift *= 2
    return a, b


def selective_scan_export(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, chunk_size=DEFAULT_CHUNK, out_dtype=None):
    """:func:`lesionkit.kernels.selective_scan` as the two-level chunked scan above.

    Same arguments and results as the selective scan, plus `chunk_size` (steps per chunk).
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = check_out_dtype(out_dtype, u.dtype)
    chunk_size = check_chunk_size(chunk_size)
    dt, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    if length == 0:  # nothing to scan: an empty output, the state stays at its zero start
        out = u * 0
        return (out, dt.new_zeros(batch, dim, n)) if return_last_state else out
    per_group = dim // groups
    T = min(chunk_size, length)
    chunks = -(-length // T)
    pad = chunks * T - length
    # Layout (T, b, g, d/g, chunks, n): step t of every chunk is one contiguous slice. The
    # padded tail has dt = 0: decay exp(0) = 1 and no input, the state passes unchanged.
    dt_c = _steps_first(dt, (groups, per_group, 1), chunks, T, pad)
    x_c = _steps_first(dt * u.to(dt.dtype), (groups, per_group, 1), chunks, T, pad)
    B_c, C_c = (_steps_first(t, (groups, 1, n), chunks, T, pad) for t in (B, C))
    A_c = A.view(1, groups, per_group, 1, n)
    decays, inputs = torch.exp(dt_c * A_c).unbind(0), (x_c * B_c).unbind(0)
    # Level 1: every chunk from a zero state, its T steps one after another, all chunks at once.
    states = [inputs[0]]
    for t in range(1, T):
        states.append(decays[t] * states[-1] + inputs[t])
    # The decay from the chunk start to each step, exp(A * (dt summed over at most T steps)).
    within = torch.exp(torch.cumsum(dt_c, 0) * A_c)
    # Level 2: the chunk-end pairs across chunks give the state at each chunk's end; the state
    # entering chunk c is the one leaving chunk c - 1 (zero for the first).
    _, ends = prefix_scan(within[-1].transpose(-1, -2), states[-1].transpose(-1, -2))  # (b, g, d/g, n, chunks)
    entering = _shifted(ends, 1, 0.0).transpose(-1, -2)
    h = torch.stack(states) + within * entering
    y = (h * C_c).sum(-1).movedim(0, -1).reshape(batch, dim, chunks * T)[..., :length]
    out = _finish(y, u, D, z, out_dtype)
    return (out, ends[..., -1].reshape(batch, dim, n)) if return_last_state else out


def selective_scan_2d_export(x, dt, A, B, C, D, dt_bias, dt_softplus=True, chunk_size=DEFAULT_CHUNK,
                             out_dtype=None):
    """:func:`lesionkit.kernels.selective_scan_2d` = cross_merge(scan(cross_scan(x))) with the
    scan of :func:`selective_scan_export`; same arguments plus `chunk_size`."""
    check_selective_scan_2d_inputs(x, dt, A, B, C, D, dt_bias)
    out_dtype = check_out_dtype(out_dtype, x.dtype)
    batch, dim, height, width = x.shape
    k, n = DIRECTIONS, A.shape[2]
    xs = cross_scan_reference(x).reshape(batch, k * dim, height * width)
    dts = directions_to_sequences(dt).reshape(batch, k * dim, height * width)
    ys = selective_scan_export(xs, dts, A.reshape(k * dim, n), directions_to_sequences(B),
                               directions_to_sequences(C), D.reshape(-1), None, dt_bias.reshape(-1),
                               dt_softplus, chunk_size=chunk_size, out_dtype=acc_dtype(x.dtype))
    return cross_merge_reference(ys.view(batch, k, dim, height * width), height, width).to(out_dtype)


__all__ = ["DEFAULT_CHUNK", "check_chunk_size", "prefix_scan", "selective_scan_2d_export",
           "selective_scan_export"]
