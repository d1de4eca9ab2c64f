"""Triton kernels of the batched k-means (AMLP Sec. 3.1).

One launch per Lloyd iteration for all problems: program b assigns the points of problem b
block by block (scores |c_j|^2 - 2 x.c_j, argmin with ties to the lower j), adds each block to
its clusters' sums in a per-problem scratch (B, k, D), then moves the centroids (an empty
cluster keeps its centroid) and clears its `active` flag once the summed squared shift is
<= tol. Converged problems return at once in later launches. A last launch writes the squared
distances to the final centroids (computed directly) and the labels. No atomics: every
problem's sums are added in point order by one program. Registered as
``lesionkit::kmeans_triton``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_BLOCK_N = 16


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
            ns = n0 + tl.arange(0, BLOCK_N)
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
            tl.store(s_base + offs, tl.zeros_like(sums), mask=inside)  # clean for the next launch
            moved = tl.where(filled[:, None], sums * inv[:, None], old)  # empty: keep
            delta = moved - old
            shift += tl.sum(delta * delta, axis=1)
            tl.store(c_base + offs, moved, mask=inside)
        total = tl.sum(shift, axis=0)
        tl.store(n_iter_ptr + b, tl.load(n_iter_ptr + b) + 1)
        tl.store(active_ptr + b, tl.where(total <= tl.load(tol_ptr + b), 0, 1).to(tl.int32))


@triton.jit
def _assign_kernel(x_ptr, c_ptr, labels_ptr, dist_ptr, N, D, K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                   ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    ns = n0 + tl.arange(0, BLOCK_N)
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
        for _ in range(iters):  # one launch per iteration; converged problems return at once
            wrap_triton(_lloyd_step_kernel)[(batch,)](
                x, centroids, sums, tol, labels, active, n_iter, n, d, K=k, BLOCK_N=_BLOCK_N,
                BLOCK_D=block_d, BLOCK_K=block_k, ACC=acc_tl)
    wrap_triton(_assign_kernel)[(batch, triton.cdiv(n, _BLOCK_N))](
        x, centroids, labels, distances, n, d, K=k, BLOCK_N=_BLOCK_N, BLOCK_D=block_d,
        BLOCK_K=block_k, ACC=acc_tl)
    return labels, centroids, distances, n_iter
