"""Triton kernels of the batched k-means (AMLP Sec. 3.1).

One launch per Lloyd iteration for all problems: program b assigns the points of problem b
block by block (scores |c_j|^2 - 2 x.c_j, argmin with ties to the lower j), adds each block to
its clusters' sums in a per-problem scratch (B, k, D), then moves the centroids (an empty
cluster keeps its centroid) and clears its `active` flag once the summed squared shift is
<= tol. Converged problems return at once in later launches. A last launch writes the squared
distances to the final centroids (computed directly) and the labels. No atomics: every
problem's sums are added in point order by one program. Registered as
``lesionkit::kmeans_triton``.

Inside a program a tile may be held by several warps at once (a replicated layout) while only
one of them stores it, so a buffer that is read and then written in the same loop (the sums,
the centroids) gets a ``tl.debug_barrier()`` between every warp's read and the write; without
it a lagging warp could read the zeroed sums or the moved centroids and report a wrong shift
(convergence flag, ``n_iter``). The assignment launch puts (problem, point block) on grid
axis 0 (:func:`assign_grid`): axis 1 would stop at 65,535 blocks, N = 1,048,560 points. Point
offsets are int64 (N * D passes 2**31 first), and launches run under the tensors' device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lesionkit.kernels.triton.launch import on_device

_BLOCK_N = 16
_MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1 and 2 stop at 65,535)


def assign_grid(batch: int, n: int) -> tuple[tuple[int], int]:
    """``(grid, blocks_per_problem)`` of the assignment launch: ``batch`` problems of ``n``
    points in blocks of ``_BLOCK_N``, (problem, block) flattened on grid axis 0."""
    blocks = triton.cdiv(max(n, 1), _BLOCK_N)
    programs = batch * blocks
    if programs > _MAX_GRID_X:
        raise ValueError(f"kmeans (triton) of {batch} problems of {n} points needs {programs} programs, "
                         f"more than a CUDA grid holds ({_MAX_GRID_X}); split the batch")
    return (programs,), blocks


@triton.jit
def _load_centroids(c_base, ks, ds, K, D, ACC: tl.constexpr):
    inside = (ks[:, None] < K) & (ds[None, :] < D)
    return tl.load(c_base + ks[:, None] * D + ds[None, :], mask=inside, other=0).to(ACC), inside


@triton.jit
def _lloyd_step_kernel(x_ptr, c_ptr, sums_ptr, tol_ptr, labels_ptr, active_ptr, n_iter_ptr, N, D,
                       K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + b) != 0:
        x_base = x_ptr + b * N * D
        c_base = c_ptr + b * K * D
        s_base = sums_ptr + b * K * D
        ks = tl.arange(0, BLOCK_K)
        norms = tl.zeros((BLOCK_K,), ACC)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            cb, _ = _load_centroids(c_base, ks, ds, K, D, ACC)
            norms += tl.sum(cb * cb, axis=1)
        counts = tl.zeros((BLOCK_K,), tl.int32)
        for n0 in range(0, N, BLOCK_N):
            ns = tl.cast(n0, tl.int64) + tl.arange(0, BLOCK_N)  # ns * D passes 2**31 first
            in_n = ns < N
            dots = tl.zeros((BLOCK_N, BLOCK_K), ACC)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                xb = tl.load(x_base + ns[:, None] * D + ds[None, :],
                             mask=in_n[:, None] & (ds[None, :] < D), other=0).to(ACC)
                cb, _ = _load_centroids(c_base, ks, ds, K, D, ACC)
                dots += tl.sum(xb[:, None, :] * cb[None, :, :], axis=2)
            scores = tl.where(ks[None, :] < K, norms[None, :] - 2 * dots, float("inf"))
            label = tl.argmin(scores, axis=1, tie_break_left=True)
            tl.store(labels_ptr + b * N + ns, label.to(tl.int64), mask=in_n)
            member = (label[:, None] == ks[None, :]) & in_n[:, None]  # (BLOCK_N, BLOCK_K)
            counts += tl.sum(member.to(tl.int32), axis=0)
            weight = member.to(ACC)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                xb = tl.load(x_base + ns[:, None] * D + ds[None, :],
                             mask=in_n[:, None] & (ds[None, :] < D), other=0).to(ACC)
                part = tl.sum(weight[:, :, None] * xb[:, None, :], axis=0)  # (BLOCK_K, BLOCK_D)
                inside = (ks[:, None] < K) & (ds[None, :] < D)
                offs = s_base + ks[:, None] * D + ds[None, :]
                tl.store(offs, tl.load(offs, mask=inside, other=0) + part, mask=inside)
                # The next read of these sums may come from another thread of the program
                # (layouts differ between loops): order the global writes before it.
                tl.debug_barrier()
        filled = counts > 0
        inv = 1.0 / tl.maximum(counts, 1).to(ACC)
        shift = tl.zeros((BLOCK_K,), ACC)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            old, inside = _load_centroids(c_base, ks, ds, K, D, ACC)
            offs = ks[:, None] * D + ds[None, :]
            sums = tl.load(s_base + offs, mask=inside, other=0)
            moved = tl.where(filled[:, None], sums * inv[:, None], old)  # empty: keep
            delta = moved - old
            shift += tl.sum(delta * delta, axis=1)
            # Every warp has read this tile's sums and old centroids before one of them
            # overwrites them (module docstring).
            tl.debug_barrier()
            tl.store(s_base + offs, tl.zeros_like(sums), mask=inside)  # clean for the next launch
            tl.store(c_base + offs, moved, mask=inside)
        total = tl.sum(shift, axis=0)
        tl.store(n_iter_ptr + b, tl.load(n_iter_ptr + b) + 1)
        tl.store(active_ptr + b, tl.where(total <= tl.load(tol_ptr + b), 0, 1).to(tl.int32))


@triton.jit
def _assign_kernel(x_ptr, c_ptr, labels_ptr, dist_ptr, N, D, blocks_per_problem, K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                   ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // blocks_per_problem
    ns = (pid % blocks_per_problem) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64
    in_n = ns < N
    ks = tl.arange(0, BLOCK_K)
    dist = tl.zeros((BLOCK_N, BLOCK_K), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        xb = tl.load(x_ptr + b * N * D + ns[:, None] * D + ds[None, :],
                     mask=in_n[:, None] & (ds[None, :] < D), other=0).to(ACC)
        cb, _ = _load_centroids(c_ptr + b * K * D, ks, ds, K, D, ACC)
        diff = xb[:, None, :] - cb[None, :, :]  # padded features are 0 - 0
        dist += tl.sum(diff * diff, axis=2)
    valid = in_n[:, None] & (ks[None, :] < K)
    tl.store(dist_ptr + b * N * K + ns[:, None] * K + ks[None, :], dist, mask=valid)
    label = tl.argmin(tl.where(ks[None, :] < K, dist, float("inf")), axis=1, tie_break_left=True)
    tl.store(labels_ptr + b * N + ns, label.to(tl.int64), mask=in_n)


@triton_op("lesionkit::kmeans_triton", mutates_args=())
def kmeans_triton(
    x: torch.Tensor, init: torch.Tensor, tol: torch.Tensor, iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    batch, n, d = x.shape
    k = init.shape[1]
    acc_tl = tl.float64 if init.dtype == torch.float64 else tl.float32
    centroids = init.contiguous().clone()
    labels = x.new_empty((batch, n), dtype=torch.int64)
    distances = init.new_empty((batch, n, k))
    n_iter = torch.zeros(batch, dtype=torch.int64, device=x.device)
    if batch == 0:
        return labels, centroids, distances, n_iter
    block_k = max(2, triton.next_power_of_2(k))
    block_d = min(triton.next_power_of_2(d), max(16, 2048 // (block_k * _BLOCK_N)))
    if iters > 0:
        sums = torch.zeros_like(centroids)
        active = torch.ones(batch, dtype=torch.int32, device=x.device)
        tol = tol.contiguous()
        with on_device(x):
            for _ in range(iters):  # one launch per iteration; converged problems return at once
                wrap_triton(_lloyd_step_kernel)[(batch,)](
                    x, centroids, sums, tol, labels, active, n_iter, n, d, K=k, BLOCK_N=_BLOCK_N,
                    BLOCK_D=block_d, BLOCK_K=block_k, ACC=acc_tl)
    grid, blocks_per_problem = assign_grid(batch, n)
    with on_device(x):
        wrap_triton(_assign_kernel)[grid](
            x, centroids, labels, distances, n, d, blocks_per_problem, K=k, BLOCK_N=_BLOCK_N,
            BLOCK_D=block_d, BLOCK_K=block_k, ACC=acc_tl)
    return labels, centroids, distances, n_iter
