"""Batched k-means (AMLP's masked patch selection, Sec. 3.1), vectorised PyTorch.

Thousands of small independent problems x (B, N, D) are solved at once: Lloyd iterations with
every problem stopping at its own convergence, no Python loop over the problems. This module
also holds what every backend shares, so that all of them start from the same centroids and
stop at the same thresholds: the input checks, the seeded initialisation (k-means++ and
farthest-point) and the per-problem tolerance. See docs/kmeans.md for the semantics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lesionkit.kernels.accumulation import acc_dtype

INITS = ("kmeans++", "farthest")


class KMeansResult(NamedTuple):
    """Result of :func:`lesionkit.kernels.kmeans`.

    labels: (B, N) int64, the nearest final centroid of every point (ties: the lower index).
    centroids: (B, k, D), the final centroids (float32 for 16-bit inputs).
    distances: (B, N, k), squared Euclidean distances of every point to every final centroid.
    n_iter: (B,) int64, centroid updates each problem ran before it converged or hit `iters`.
    """

    labels: torch.Tensor
    centroids: torch.Tensor
    distances: torch.Tensor
    n_iter: torch.Tensor


def check_kmeans_inputs(x: torch.Tensor, k: int, iters: int, tol: float,
                        init: str | torch.Tensor, seed: int | None) -> None:
    """Raise ValueError naming the argument for every input k-means cannot take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x should be a tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x should be a (B, N, D) tensor, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x should be a floating tensor, got {x.dtype}")
    if x.shape[0] > 0 and (x.shape[1] == 0 or x.shape[2] == 0):
        raise ValueError(f"x should have N >= 1 points of D >= 1 features per problem, got shape "
                         f"{tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k should be an int >= 1, got {k!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters should be an int >= 0, got {iters!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol != tol:
        raise ValueError(f"tol should be a number (< 0 disables the convergence test), got {tol!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed should be an int or None, got {seed!r}")
    if isinstance(init, torch.Tensor):
        want = (x.shape[0], k, x.shape[2])
        if tuple(init.shape) != want:
            raise ValueError(f"init should be a (B, k, D) = {want} tensor of initial centroids, "
                             f"got shape {tuple(init.shape)}")
        if not init.dtype.is_floating_point:
            raise ValueError(f"init should be a floating tensor, got {init.dtype}")
        if init.device != x.device:
            raise ValueError(f"init should be on x's device {x.device}, got {init.device}")
    elif init not in INITS:
        raise ValueError(f"init should be one of {INITS} or a (B, k, D) tensor, got {init!r}")


def _bad_problems(values: torch.Tensor) -> list[int]:
    flat = values.reshape(values.shape[0], -1)
    return (~torch.isfinite(flat).all(dim=1)).nonzero().flatten().tolist()


def kmeans_tolerance(x: torch.Tensor, tol: float) -> torch.Tensor:
    """Per-problem threshold (B,) on the summed squared centroid shift, in x's accumulation dtype.

    As in scikit-learn, `tol` is relative to the data: tol * mean over features of the variance
    of the problem's points; tol < 0 gives -inf (never converged: exactly `iters` updates).
    Everything is computed in the accumulation dtype (float64 reductions of float32 data cost
    more than the k-means itself). First the sum of squares of each problem, one vectorised pass
    that is also the check that x is finite (NaN and inf make it non-finite). The variance is
    E|y|^2 - |E y|^2 of the points shifted by the problem's first point, y = x - x_0: the shift
    changes no variance and removes the cancellation that data far from the origin would cause.
    """
    batch, n, d = x.shape
    acc = acc_dtype(x.dtype)
    sum_sq = torch.linalg.vector_norm(x.reshape(batch, n * d), dim=1, dtype=acc).square()
    if not torch.compiler.is_compiling():
        bad = _bad_problems(sum_sq)
        if bad:
            nan = _bad_problems(x)
            if nan:
                raise ValueError(f"x should be finite, problems {nan[:10]} hold NaN or inf values")
            raise ValueError(f"x is too large for k-means: the sum of squares of problems "
                             f"{bad[:10]} overflows {acc}")
    if tol < 0:
        return torch.full((batch,), float("-inf"), dtype=acc, device=x.device)
    shifted = x.to(acc) - x[:, :1].to(acc)
    shifted_sq = torch.linalg.vector_norm(shifted.reshape(batch, n * d), dim=1).square()
    mean = shifted.sum(dim=1) / n
    variance = (shifted_sq / (n * d) - mean.square().sum(dim=1) / d).clamp_min(0)
    return variance * tol


def _sq_dist_to(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances (B, N) from every point to one centroid per problem c (B, D)."""
    dot = torch.bmm(x, c.unsqueeze(2)).squeeze(2)
    return (x_sq - 2 * dot + c.square().sum(dim=1, keepdim=True)).clamp_min_(0)


def _gather_points(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.view(-1, 1, 1).expand(-1, 1, x.shape[2])).squeeze(1)


def kmeans_init(x: torch.Tensor, k: int, init: str | torch.Tensor,
                seed: int | None = None) -> torch.Tensor:
    """Initial centroids (B, k, D) in x's accumulation dtype, the same for every backend.

    - a tensor: used as given (converted to the accumulation dtype);
    - "kmeans++": the first centroid a uniformly drawn point, every next one a point drawn with
      probability proportional to its squared distance to the nearest centroid so far (plain
      k-means++, one candidate per step). All random numbers come from one CPU generator seeded
      with `seed` (None: a seed drawn from torch's global generator) and are moved to x's
      device, so a seed picks the same points on every backend and device (up to rounding of
      the distances that weight the draw). A problem whose points are all equal repeats them.
    - "farthest": deterministic farthest-point traversal; the first centroid is the point
      farthest from the problem's mean, every next one the point farthest from its nearest
      centroid so far (ties: the lowest index). `seed` is not used.
    """
    acc = acc_dtype(x.dtype)
    if isinstance(init, torch.Tensor):
        return init.detach().to(acc).contiguous().clone()
    batch, n, _ = x.shape
    xa = x.detach().to(acc)
    x_sq = torch.linalg.vector_norm(xa, dim=2).square()
    centroids = xa.new_empty((batch, k, x.shape[2]))
    if init == "kmeans++":
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator(device="cpu").manual_seed(seed)
        draws = torch.rand((batch, k), generator=gen, dtype=torch.float64).to(x.device)
        first = (draws[:, 0] * n).long().clamp_max_(n - 1)
    else:
        mean = xa.mean(dim=1)
        first = _sq_dist_to(xa, x_sq, mean).argmax(dim=1)
    centroids[:, 0] = _gather_points(xa, first)
    nearest = _sq_dist_to(xa, x_sq, centroids[:, 0])
    for j in range(1, k):  # a loop over the k centroids, never over the problems
        if init == "kmeans++":
            weights = nearest.double()
            cdf = weights.cumsum(dim=1)
            total = cdf[:, -1]
            pick = torch.searchsorted(cdf, (draws[:, j] * total).unsqueeze(1), right=True)
            pick = pick.squeeze(1).clamp_max_(n - 1)
            uniform = (draws[:, j] * n).long().clamp_max_(n - 1)
            pick = torch.where(total > 0, pick, uniform)  # all points on the centroids so far
        else:
            pick = nearest.argmax(dim=1)
        centroids[:, j] = _gather_points(xa, pick)
        nearest = torch.minimum(nearest, _sq_dist_to(xa, x_sq, centroids[:, j]))
    return centroids


def kmeans_distances_reference(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Squared distances (B, N, k) computed directly (no |x|^2 - 2 x.c + |c|^2 cancellation)."""
    return torch.cdist(x, centroids, compute_mode="donot_use_mm_for_euclid_dist").square_()


def kmeans_lloyd_reference(x: torch.Tensor, centroids: torch.Tensor, tol: torch.Tensor,
                           iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """Lloyd iterations from given centroids: the semantics every backend implements.

    x (B, N, D), centroids (B, k, D) and tol (B,) in the accumulation dtype. One iteration
    assigns every point to the nearest centroid (argmin over j of |c_j|^2 - 2 x.c_j, ties to the
    lower j) and moves each centroid to the mean of its points; a centroid with no points stays
    where it is. A problem converges once the summed squared shift of its centroids is <= its
    tol, and is not updated after. Returns (labels, centroids, distances, n_iter) with labels
    and distances for the final centroids.
    """
    batch, k = centroids.shape[:2]
    c = centroids.clone()
    n_iter = torch.zeros(batch, dtype=torch.int64, device=x.device)
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    for _ in range(iters):
        # score_j = |c_j|^2 - 2 x.c_j; for k = 2 its sign difference is the test
        # 2 x.(c1 - c0) + |c0|^2 - |c1|^2 > 0 of the compiled kernels.
        scores = torch.baddbmm(c.square().sum(dim=2).unsqueeze(1), x, c.transpose(1, 2),
                               alpha=-2)
        labels = scores.argmin(dim=2)
        one_hot = torch.nn.functional.one_hot(labels, k).to(x.dtype).transpose(1, 2)  # (B, k, N)
        sums = torch.bmm(one_hot, x)
        counts = one_hot.sum(dim=2, keepdim=True)
        c_new = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        shift = (c_new - c).square().sum(dim=(1, 2))
        c = torch.where(active.view(-1, 1, 1), c_new, c)
        n_iter += active.long()
        active &= ~(shift <= tol)
        if not torch.compiler.is_compiling() and not bool(active.any()):
            break
    distances = kmeans_distances_reference(x, c)
    return distances.argmin(dim=2), c, distances, n_iter


def kmeans_reference(x: torch.Tensor, k: int = 2, iters: int = 20, tol: float = 1e-4,
                     init: str | torch.Tensor = "kmeans++",
                     seed: int | None = None) -> KMeansResult:
    """Reference of :func:`lesionkit.kernels.kmeans` (same arguments and result)."""
    check_kmeans_inputs(x, k, iters, tol, init, seed)
    acc = acc_dtype(x.dtype)
    if x.shape[0] == 0:
        return _empty_result(x, k)
    with torch.no_grad():
        tol_b = kmeans_tolerance(x, tol)
        start = kmeans_init(x, k, init, seed)
        if isinstance(init, torch.Tensor):
            check_finite_init(start)
        return KMeansResult(*kmeans_lloyd_reference(x.detach().to(acc), start, tol_b, iters))


def check_finite_init(centroids: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        return
    bad = _bad_problems(centroids)
    if bad:
        raise ValueError(f"init should be finite, problems {bad[:10]} hold NaN or inf values")


def _empty_result(x: torch.Tensor, k: int) -> KMeansResult:
    acc = acc_dtype(x.dtype)
    batch, n, d = x.shape
    return KMeansResult(
        x.new_empty((batch, n), dtype=torch.int64), x.new_empty((batch, k, d), dtype=acc),
        x.new_empty((batch, n, k), dtype=acc), x.new_empty((batch,), dtype=torch.int64))
