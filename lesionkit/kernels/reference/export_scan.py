"""The selective scan and the SS2D core as a fixed graph of plain tensor ops, for export (docs/ops.md).

The recurrence h_t = a_t * h_{t-1} + b_t, with a_t = exp(dt_t * A) and b_t = dt_t * B_t * u_t
(docs/ops.md, ``selective_scan``), is a first-order linear recurrence, and the pairs (a, b)
compose associatively: applying (a1, b1) then (a2, b2) is (a1 * a2, a2 * b1 + b2). So every h_t
comes out of a parallel prefix scan (Hillis-Steele): after the round with shift s, position t
holds the composition of the 2s steps ending at t, and log2(T) rounds cover a chunk of T steps.

This module scans in two levels, with no Python loop over the sequence length:

1. The sequence is cut into chunks of ``chunk_size`` T steps (the tail padded with dt = 0: decay
   1, no input). Every chunk is scanned at once from a zero state in ceil(log2 T) rounds; the
   rounds also leave, at each step, the decay from the chunk start to that step.
2. The chunk-end (decay, state) pairs are scanned the same way across the chunks, which gives
   the state entering each chunk; each step adds it times its decay from the chunk start.

Each round is a pad, a slice, two multiplies and an add, so ``torch.export`` and the ONNX
exporter trace it into a graph whose size grows with log2(T) + log2(l / T), not with l.
Everything stays in the multiplicative form: only exp(dt * A) with dt * A <= 0 (for A < 0) is
ever taken, and products of decays can only shrink toward zero, so nothing overflows on long
sequences or for large |A| * dt (a log-space form would divide by exp of a cumulative sum, or
subtract cumulative sums that lose float32 digits once they grow large). The price is memory
and work: the states (b, d, n, l) are held in full, and each round reads and writes them.
"""

from __future__ import annotations

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
    """:func:`lesionkit.kernels.selective_scan` as the two-level parallel prefix scan above.

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
    # Layout (b, g, d/g, n, chunks, T): steps last, so every round shifts the last dimension.
    # The padded tail has dt = 0: decay exp(0) = 1 and no input, the state passes unchanged.
    dt_c = F.pad(dt, (0, pad)).view(batch, groups, per_group, 1, chunks, T)
    x_c = F.pad(dt * u.to(dt.dtype), (0, pad)).view(batch, groups, per_group, 1, chunks, T)
    B_c, C_c = (F.pad(t, (0, pad)).view(batch, groups, 1, n, chunks, T) for t in (B, C))
    decay = torch.exp(dt_c * A.view(1, groups, per_group, n, 1, 1))
    # Level 1: every chunk from a zero state; `within` is the decay from the chunk start to t.
    within, h = prefix_scan(decay, x_c * B_c)
    # Level 2: the chunk-end pairs across chunks give the state at each chunk's end; the state
    # entering chunk c is the one leaving chunk c - 1 (zero for the first).
    _, ends = prefix_scan(within[..., -1], h[..., -1])
    entering = _shifted(ends, 1, 0.0)
    h = h + within * entering.unsqueeze(-1)
    y = (h * C_c).sum(3).reshape(batch, dim, chunks * T)[..., :length]
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
