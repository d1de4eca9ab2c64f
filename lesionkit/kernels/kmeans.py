"""Public API of the batched k-means (AMLP's masked patch selection, Sec. 3.1).

``kmeans`` validates its inputs, computes what every backend shares - the per-problem
tolerance and the seeded initial centroids (:mod:`lesionkit.kernels.reference.kmeans`) - picks
a backend (see :mod:`lesionkit.kernels.backend`) and runs the Lloyd iterations with
``torch.ops.lesionkit.kmeans`` (cpu, cuda), ``torch.ops.lesionkit.kmeans_triton`` (triton) or
the pure-PyTorch reference. k-means has no gradient: every output is non-differentiable.
"""

from __future__ import annotations

import torch

from lesionkit.kernels import _library
from lesionkit.kernels.accumulation import acc_dtype
from lesionkit.kernels.backend import OpSpec, lazy_triton_module, register_op, select_backend
from lesionkit.kernels.reference.kmeans import (
    KMeansResult,
    _empty_result,
    check_finite_init,
    check_kmeans_inputs,
    kmeans_init,
    kmeans_lloyd_reference,
    kmeans_tolerance,
)

# auto on a GPU: Triton, then the reference; the CUDA kernel took 66.6 ms where Triton took 21.4
# and the reference 23.1 on the first H200 run (README "GPU, first run", 32 x 50,176 points).
OP = register_op(OpSpec("kmeans", auto_gpu_order=("triton", "reference", "cuda")))


def _fake_kmeans(x, init, tol, iters):
    batch, n, _ = x.shape
    k = init.shape[1]
    index = x.new_empty((batch, n), dtype=torch.int64)
    return (index, init.new_empty(init.shape), init.new_empty((batch, n, k)),
            x.new_empty((batch,), dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _no_gradient(ctx, *grads):
    return None, None, None, None


if _library.HAS_OPS:
    torch.library.register_fake("lesionkit::kmeans")(_fake_kmeans)
    # Registered so that inputs requiring grad are accepted; the outputs carry no gradient.
    torch.library.register_autograd("lesionkit::kmeans", _no_gradient,
                                    setup_context=_setup_context)

_triton = lazy_triton_module("kmeans", lambda t: torch.library.register_autograd(
    "lesionkit::kmeans_triton", _no_gradient, setup_context=_setup_context))


def kmeans(
    x: torch.Tensor,
    k: int = 2,
    iters: int = 20,
    tol: float = 1e-4,
    init: str | torch.Tensor = "kmeans++",
    seed: int | None = None,
) -> KMeansResult:
    """Lloyd's k-means on B independent problems at once (AMLP Sec. 3.1 uses k = 2).

    Args:
        x: (B, N, D) floating points, N >= 1 and D >= 1 per problem; float16 / bfloat16 are
            accumulated in float32. Must be finite.
        k: clusters per problem (>= 1). N < k is allowed: clusters that get no point keep
            their initial centroid.
        iters: at most this many centroid updates per problem.
        tol: a problem stops once the summed squared shift of its centroids in one update is
            <= tol * (mean over features of the variance of its points), scikit-learn's
            criterion; tol < 0 disables the test (exactly `iters` updates).
        init: "kmeans++" (seeded), "farthest" (deterministic farthest-point traversal) or a
            (B, k, D) tensor of initial centroids.
        seed: seed of the k-means++ draws (None: drawn from torch's global generator). The same
            seed gives the same initial centroids on every backend.

    Returns:
        :class:`KMeansResult` (labels (B, N) int64, centroids (B, k, D), squared distances
        (B, N, k), n_iter (B,) int64); centroids and distances are float64 for float64 input,
        float32 otherwise. Labels are the argmin of the returned distances (ties: lower index).
        An empty cluster keeps its previous centroid, so no output is ever NaN.
    """
    check_kmeans_inputs(x, k, iters, tol, init, seed)
    if x.shape[0] == 0:
        return _empty_result(x, k)
    with torch.no_grad():
        x = x.detach()
        tol_b = kmeans_tolerance(x, float(tol))
        start = kmeans_init(x, k, init, seed)
        if isinstance(init, torch.Tensor):
            check_finite_init(start)
        backend = select_backend(OP.name, x.device)
        if backend == "reference":
            out = kmeans_lloyd_reference(x.to(acc_dtype(x.dtype)), start, tol_b, iters)
        elif backend == "triton":
            out = _triton().kmeans_triton(x, start, tol_b, iters)
        else:
            out = torch.ops.lesionkit.kmeans(x, start, tol_b, iters)
    return KMeansResult(*out)
