"""kmeans: B independent problems (B, N, D) with k = 2 and 20 Lloyd iterations.

Providers: the lesionkit backends (reference, cpu; cuda and triton on a GPU), scikit-learn and
faiss-cpu called once per problem in a Python loop, and fast-pytorch-kmeans `MultiKMeans`
(batched). Every provider starts from the same initial centroids; lesionkit runs with tol < 0
(exactly 20 updates), faiss always runs its `niter`, fast-pytorch-kmeans with tol < 0 too;
scikit-learn with tol = 0 still stops early once the labels stop changing (its mean iteration
count is recorded in extra_info). Shapes: B in 32 | 1024, N in 64 | 196 | 256, D = 768 (16 x 16 x 3 pixel patches).
On a CPU the scikit-learn loop runs at B = 32 only (seconds per round already); the faiss loop,
the fastest outside CPU peer, runs at every shape. `min_bytes` is one read of x: the traffic
from memory when each problem stays in cache for its iterations.
"""

import importlib.util

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels.backend import unavailable_reason
from lesionkit.kernels.reference.kmeans import kmeans_init

from conftest import synchronize

ITERS, CLUSTERS, DIM = 20, 2, 768
SHAPES = [(b, n, DIM) for b in (32, 1024) for n in (64, 196, 256)]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = ["reference", "cpu", "cuda", "triton", "sklearn", "faiss", "fast_pytorch_kmeans"]
LOOPS = ("sklearn", "faiss")
B32_ONLY = ("sklearn",)


def _lesionkit(provider):
    if unavailable_reason("kmeans", provider, DEVICE):
        return None
    if provider == "triton" and DEVICE.type == "cpu":
        return None  # the interpreter is for correctness, not speed

    def fn(x, init):
        with K.use_backend(provider):
            return K.kmeans(x, k=CLUSTERS, iters=ITERS, tol=-1.0, init=init)

    return fn


def _sklearn():
    if importlib.util.find_spec("sklearn") is None or DEVICE.type != "cpu":
        return None
    from sklearn.cluster import KMeans

    def fn(x, init):
        xs, cs = x.numpy(), init.numpy()
        return [KMeans(CLUSTERS, init=c, n_init=1, algorithm="lloyd", max_iter=ITERS, tol=0.0)
                .fit(p).n_iter_ for p, c in zip(xs, cs)]

    return fn


def _faiss():
    if importlib.util.find_spec("faiss") is None or DEVICE.type != "cpu":
        return None
    import faiss

    def fn(x, init):
        xs, cs = x.numpy(), init.numpy()
        for p, c in zip(xs, cs):
            km = faiss.Kmeans(DIM, CLUSTERS, niter=ITERS, min_points_per_centroid=1,
                              max_points_per_centroid=1 << 20, seed=0)
            km.train(p, init_centroids=c)
        return None

    return fn


def _fast_pytorch_kmeans():
    if importlib.util.find_spec("fast_pytorch_kmeans") is None:
        return None
    from fast_pytorch_kmeans import MultiKMeans

    def fn(x, init):
        # tol < 0: all 20 iterations (its stop test is global over the batch). Setting
        # `centroids` first skips its own per-problem init loop, which fit_predict would
        # otherwise run (and time) before taking the given centroids.
        km = MultiKMeans(n_clusters=CLUSTERS, max_iter=ITERS, tol=-1.0, mode="euclidean")
        km.centroids = init.clone()
        return km.fit_predict(x, centroids=init.clone())

    return fn


def _provider_fn(provider):
    if provider == "sklearn":
        return _sklearn()
    if provider == "faiss":
        return _faiss()
    if provider == "fast_pytorch_kmeans":
        return _fast_pytorch_kmeans()
    return _lesionkit(provider)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_kmeans(benchmark, provider, shape, machine):
    fn = _provider_fn(provider)
    if fn is None:
        pytest.skip(f"{provider} unavailable on {DEVICE}")
    if provider in B32_ONLY and shape[0] > 32:
        pytest.skip("the scikit-learn loop runs at B = 32 only on a CPU (seconds per round)")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen)  # pixel-like values in [0, 1)
    x[:, : shape[1] // 5] += 0.3  # a smaller 'lesion' group
    x = x.to(DEVICE)
    init = kmeans_init(x, CLUSTERS, "kmeans++", seed=0)

    def step():
        out = fn(x, init)
        synchronize(DEVICE)
        return out

    step()  # warm-up
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"kmeans k={CLUSTERS} iters={ITERS} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(
        op="kmeans", provider=provider, shape=list(shape), k=CLUSTERS, iters=ITERS,
        machine=machine, device=str(DEVICE), threads=torch.get_num_threads(),
        min_bytes=x.numel() * x.element_size())
    if provider == "sklearn":
        runs = step()
        benchmark.extra_info["sklearn_mean_iterations"] = sum(runs) / len(runs)
    big = shape[0] * shape[1] > 32 * 256
    rounds = (3 if big else 10) if DEVICE.type == "cpu" else 50
    if provider in LOOPS or provider == "reference":
        rounds = min(rounds, 5 if shape[0] <= 32 else 3)
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
