"""kmeans on every backend against its reference and against scikit-learn (docs/kmeans.md)."""

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels import _library
from lesionkit.kernels.reference.kmeans import kmeans_init, kmeans_lloyd_reference, kmeans_tolerance

from conftest import backend_params

OP = "kmeans"
BACKENDS = backend_params(OP)
ALL = BACKENDS + [pytest.param("reference", torch.device("cpu"), id="reference")]


def blobs(b, n, d, k=2, dtype=torch.float64, device="cpu", seed=0, spread=3.0):
    """B problems of k Gaussian blobs of uneven sizes (a small 'lesion' and a large rest)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, k, d, generator=gen, dtype=torch.float64) * spread
    sizes = torch.rand(b, n, generator=gen, dtype=torch.float64)
    which = (sizes * k).long().clamp_max(k - 1)
    x = centres.gather(1, which.unsqueeze(2).expand(-1, -1, d))
    x = x + torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def interpreted(backend, device):
    """The Triton interpreter runs every program in Python: keep its problems small."""
    return backend == "triton" and torch.device(device).type == "cpu"


def run(backend, *args, **kwargs):
    with K.use_backend(backend):
        return K.kmeans(*args, **kwargs)


def near_ties(x, centroids, rel=1e-6):
    """Points whose two nearest centroids are within `rel` of each other (labels may differ)."""
    dist = torch.cdist(x.double(), centroids.double()).square()
    two = dist.topk(min(2, dist.shape[-1]), dim=-1, largest=False).values
    if two.shape[-1] < 2:
        return torch.zeros(dist.shape[:-1], dtype=torch.bool)
    scale = dist.amax(dim=-1).clamp_min(1e-300)
    return (two[..., 1] - two[..., 0]) <= rel * scale


def assert_same_clustering(got, want, x, rtol=1e-5, atol=1e-8):
    """Labels equal except at near-ties, centroids and n_iter equal."""
    ties = near_ties(x.cpu(), want.centroids.cpu())  # GPU results are compared on the CPU
    assert ((got.labels.cpu() == want.labels.cpu()) | ties).all()
    torch.testing.assert_close(got.centroids.cpu().double(), want.centroids.cpu().double(), rtol=rtol,
                               atol=atol)
    assert torch.equal(got.n_iter.cpu(), want.n_iter.cpu())


# (B, N, D, k): odd sizes, N = 1, D = 1, k = 1, k > 4 (the CUDA kernel's register passes), N < k.
SHAPES = [(3, 37, 5, 2), (2, 64, 33, 3), (1, 1, 4, 2), (4, 20, 1, 2), (2, 17, 6, 1),
          (2, 50, 9, 6), (3, 3, 4, 5)]


# Comparisons with the reference run on the compiled backends only: the reference against
# itself would prove nothing.
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backends_match_reference_float64(backend, device, shape):
    b, n, d, k = shape
    x = blobs(b, n, d, k=max(k, 2), device=device, seed=sum(shape))
    got = run(backend, x, k=k, iters=25, seed=3)
    want = run("reference", x.cpu(), k=k, iters=25, seed=3)
    assert got.labels.dtype == torch.int64 and got.labels.shape == (b, n)
    assert got.centroids.shape == (b, k, d) and got.distances.shape == (b, n, k)
    assert got.n_iter.dtype == torch.int64 and got.n_iter.shape == (b,)
    assert_same_clustering(got, want, x.cpu())
    torch.testing.assert_close(got.distances.cpu(), want.distances, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_inputs_accumulate_in_float32(backend, device, dtype):
    x = blobs(4, 40, 24, dtype=dtype, device=device, seed=7)
    got = run(backend, x, iters=20, seed=1)
    assert got.centroids.dtype == torch.float32 and got.distances.dtype == torch.float32
    # The same problems in float64 from the same (rounded) points: float32 accumulation.
    want = run("reference", x.cpu().double(), iters=20, seed=1)
    assert_same_clustering(got, want, x.cpu().double(), rtol=1e-4, atol=1e-4)


def sklearn_kmeans(x, init, tol=1e-4, max_iter=300):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    labels, centroids, n_iter = [], [], []
    for xb, cb in zip(x.numpy(), init.numpy()):
        model = sklearn_cluster.KMeans(n_clusters=cb.shape[0], init=cb, n_init=1,
                                       algorithm="lloyd", tol=tol, max_iter=max_iter).fit(xb)
        labels.append(torch.from_numpy(model.labels_).long())
        centroids.append(torch.from_numpy(model.cluster_centers_))
        n_iter.append(model.n_iter_)
    return torch.stack(labels), torch.stack(centroids), torch.tensor(n_iter)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("k", [2, 3])
def test_matches_scikit_learn_lloyd(backend, device, k):
    b, n = (2, 40) if interpreted(backend, device) else (6, 80)
    x = blobs(b, n, 12, k=k, seed=11 + k, spread=1.0)  # overlapping blobs: several iterations
    init = kmeans_init(x, k, "kmeans++", seed=5)
    want_labels, want_centroids, want_iter = sklearn_kmeans(x, init)
    got = run(backend, x.to(device), k=k, iters=300, init=init.to(device))
    ties = near_ties(x, want_centroids)
    # Labels equal up to ties; the same init fixes the label order (no swap to undo).
    assert ((got.labels.cpu() == want_labels) | ties).all()
    torch.testing.assert_close(got.centroids.cpu(), want_centroids, rtol=1e-5, atol=1e-8)
    assert torch.equal(got.n_iter.cpu(), want_iter)
    assert (want_iter > 1).any()  # the check saw real iterations


def test_matches_scikit_learn_up_to_label_swap_from_its_own_init():
    # scikit-learn's own k-means++ draws differ from ours: the partitions still agree on
    # well-separated blobs, up to which cluster is called 0.
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = blobs(5, 60, 8, seed=21, spread=4.0)
    got = K.kmeans(x, k=2, seed=0)
    for b in range(5):
        model = sklearn_cluster.KMeans(2, n_init=1, algorithm="lloyd", random_state=0).fit(x[b].numpy())
        theirs = torch.from_numpy(model.labels_).long()
        swapped = 1 - theirs
        assert torch.equal(got.labels[b], theirs) or torch.equal(got.labels[b], swapped)


@pytest.mark.parametrize("backend,device", ALL)
def test_all_points_equal(backend, device):
    x = torch.full((3, 10, 4), 2.5, dtype=torch.float64, device=device)
    for init in ("kmeans++", "farthest"):
        got = run(backend, x, k=2, init=init, seed=0)
        assert torch.isfinite(got.centroids).all() and torch.isfinite(got.distances).all()
        assert (got.labels == 0).all()  # ties go to the lower index
        torch.testing.assert_close(got.centroids, torch.full_like(got.centroids, 2.5))
        assert (got.distances == 0).all()
        assert (got.n_iter == 1).all()  # nothing moves: converged after the first update


@pytest.mark.parametrize("backend,device", ALL)
def test_fewer_points_than_clusters_keeps_empty_centroids(backend, device):
    x = torch.tensor([[[0.0, 0.0], [4.0, 0.0]]], dtype=torch.float64, device=device)
    init = torch.tensor([[[0.0, 1.0], [4.0, 1.0], [50.0, 50.0], [-9.0, 3.0]]],
                        dtype=torch.float64, device=device)
    got = run(backend, x, k=4, init=init)
    assert got.labels.tolist() == [[0, 1]]
    torch.testing.assert_close(got.centroids[0, :2], x[0])
    torch.testing.assert_close(got.centroids[0, 2:], init[0, 2:])  # empty: never NaN, unmoved
    # k-means++ on N < k repeats points instead of failing.
    got = run(backend, x, k=4, seed=1)
    assert torch.isfinite(got.centroids).all()


@pytest.mark.parametrize("backend,device", ALL)
def test_duplicate_points(backend, device):
    base = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0]],
                        dtype=torch.float64)
    x = base.repeat(2, 1, 1).to(device)
    for init in ("kmeans++", "farthest"):
        got = run(backend, x, k=2, init=init, seed=2)
        sizes = torch.stack([(got.labels == j).sum(1) for j in range(2)], 1).sort(1).values
        assert sizes.tolist() == [[2, 3], [2, 3]]
        assert torch.isfinite(got.centroids).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend,device", ALL)
def test_non_finite_input_is_a_clear_error(backend, device, value):
    x = blobs(3, 10, 4, device=device)
    x[1, 4, 2] = value
    with pytest.raises(ValueError, match=r"x should be finite, problems \[1\]"):
        run(backend, x)


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
def test_compiled_op_reports_non_finite_input():
    # A direct torch.ops call skips the wrapper's check; the CPU kernel still refuses NaN.
    x = blobs(2, 8, 3)
    x[1, 0, 0] = float("nan")
    init = x[:, :2].clone()
    tol = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="x should be finite, problem 1"):
        torch.ops.lesionkit.kmeans(x, init, tol, 5)


@pytest.mark.parametrize("backend,device", ALL)
def test_same_seed_same_result_and_different_seeds_differ(backend, device):
    b, n = (3, 12) if interpreted(backend, device) else (8, 30)
    x = blobs(b, n, 6, k=4, device=device, seed=9, spread=1.0)
    first = run(backend, x, k=4, seed=123)
    again = run(backend, x, k=4, seed=123)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    inits = {tuple(kmeans_init(x, 4, "kmeans++", seed=s).flatten().tolist()) for s in range(4)}
    assert len(inits) > 1
    # seed=None follows torch's global generator.
    torch.manual_seed(0)
    one = run(backend, x, k=4, seed=None)
    torch.manual_seed(0)
    two = run(backend, x, k=4, seed=None)
    assert torch.equal(one.centroids, two.centroids)


def test_every_backend_gets_the_same_initial_centroids():
    x = blobs(4, 25, 5, k=3, seed=4)
    for init in ("kmeans++", "farthest"):
        start = kmeans_init(x, 3, init, seed=8)
        for backend, _ in [p.values for p in ALL]:
            got = run(backend, x, k=3, iters=0, init=init, seed=8)
            torch.testing.assert_close(got.centroids, start, rtol=0, atol=0)
            assert (got.n_iter == 0).all()


def test_kmeans_plus_plus_draws_proportional_to_squared_distance():
    # One far point and many points at the origin: the second centroid is almost always the
    # far point (weight 100 vs 0 for the rest once the first centroid is at the origin).
    x = torch.zeros(400, 6, 1, dtype=torch.float64)
    x[:, 5, 0] = 10.0
    start = kmeans_init(x, 2, "kmeans++", seed=0)
    assert (start.squeeze(-1).sort(dim=1).values == torch.tensor([0.0, 10.0])).all()
    # The first centroid is drawn uniformly: the far point comes first in about 1 of 6 problems.
    first_far = (start[:, 0, 0] == 10.0).double().mean().item()
    assert 0.1 < first_far < 0.25


def test_farthest_init_is_deterministic_and_spreads():
    x = torch.tensor([[[0.0], [1.0], [2.0], [10.0]]], dtype=torch.float64)
    start = kmeans_init(x, 2, "farthest")
    assert start.flatten().tolist() == [10.0, 0.0]  # farthest from the mean, then from it


@pytest.mark.parametrize("backend,device", ALL)
def test_each_problem_stops_at_its_own_convergence(backend, device):
    # Problem 0 starts at its optimum (one update); problem 1 needs several.
    x = blobs(2, 30 if interpreted(backend, device) else 60, 4, seed=5, spread=0.7)
    opt = run("reference", x[:1], iters=100, tol=0.0, seed=0).centroids
    init = torch.cat([opt, x[1:, :2].clone()])
    # A tiny tol rather than 0: a backend's sums may round differently from the reference's.
    got = run(backend, x.to(device), iters=100, tol=1e-12, init=init.to(device))
    assert got.n_iter[0].item() == 1
    assert got.n_iter[1].item() > 2
    # Stopping problem 0 early did not change problem 1.
    alone = run("reference", x[1:], iters=100, tol=1e-12, init=init[1:])
    torch.testing.assert_close(got.centroids[1:].cpu(), alone.centroids)
    # tol < 0: exactly `iters` updates everywhere.
    fixed = run(backend, x.to(device), iters=7, tol=-1.0, init=init.to(device))
    assert fixed.n_iter.tolist() == [7, 7]


def test_tolerance_is_the_mean_feature_variance_also_far_from_the_origin():
    # scikit-learn's criterion: tol * mean over features of the variance over the points. Data
    # offset by 1000 would lose every digit of a one-pass float32 E|x|^2 - |E x|^2.
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 50, 24, generator=gen) * torch.tensor([1.0, 0.1, 5.0]).view(3, 1, 1)
    for offset in (0.0, 1000.0):
        data = x + offset
        want = data.double().var(dim=1, correction=0).mean(dim=1) * 1e-3
        torch.testing.assert_close(kmeans_tolerance(data, 1e-3).double(), want, rtol=1e-4, atol=0)
        torch.testing.assert_close(kmeans_tolerance(data.double(), 1e-3), want, rtol=1e-10, atol=0)


def test_tolerance_is_relative_to_the_data_scale():
    x = blobs(2, 30, 3)
    tol = kmeans_tolerance(x * 10, 1e-3)
    torch.testing.assert_close(tol, kmeans_tolerance(x, 1e-3) * 100)
    assert torch.isneginf(kmeans_tolerance(x, -1)).all()


def test_labels_are_argmin_of_distances_and_result_has_no_gradient():
    x = blobs(3, 20, 4, dtype=torch.float32).requires_grad_()
    got = K.kmeans(x, k=3, seed=0)
    assert torch.equal(got.labels, got.distances.argmin(-1))
    assert not got.centroids.requires_grad and not got.distances.requires_grad
    xd = x.detach().double()
    torch.testing.assert_close(got.distances.double(), torch.cdist(xd, got.centroids.double()).square(),
                               rtol=1e-4, atol=1e-4)


def test_empty_batch():
    got = K.kmeans(torch.zeros(0, 5, 3), k=2)
    assert got.labels.shape == (0, 5) and got.centroids.shape == (0, 2, 3)
    assert got.distances.shape == (0, 5, 2) and got.n_iter.shape == (0,)


def test_reference_lloyd_matches_a_direct_transcription():
    # Lloyd's algorithm written out per problem and per point in Python: an independent oracle.
    x = blobs(2, 15, 3, seed=13, spread=1.0)
    init = x[:, :2].clone()
    tol = torch.zeros(2, dtype=torch.float64)
    labels, centroids, _, n_iter = kmeans_lloyd_reference(x, init, tol, 50)
    for b in range(2):
        c = init[b].tolist()
        for it in range(50):
            assign = [min(range(2), key=lambda j: sum((p - q) ** 2 for p, q in zip(pt, c[j])))
                      for pt in x[b].tolist()]
            new = []
            for j in range(2):
                members = [pt for pt, a in zip(x[b].tolist(), assign) if a == j]
                new.append([sum(v) / len(members) for v in zip(*members)] if members else c[j])
            moved = sum((p - q) ** 2 for cn, co in zip(new, c) for p, q in zip(cn, co))
            c = new
            if moved <= 0:
                break
        assert n_iter[b].item() == it + 1
        torch.testing.assert_close(centroids[b], torch.tensor(c, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.zeros(4, 3)), r"x should be a \(B, N, D\) tensor, got shape \(4, 3\)"),
        (dict(x=torch.zeros(2, 0, 3)), "N >= 1 points of D >= 1"),
        (dict(x=torch.zeros(2, 4, 3, dtype=torch.int64)), "x should be a floating tensor"),
        (dict(k=0), "k should be an int >= 1, got 0"),
        (dict(k=2.0), "k should be an int >= 1"),
        (dict(iters=-1), "iters should be an int >= 0, got -1"),
        (dict(tol=float("nan")), "tol should be a number"),
        (dict(init="random"), "init should be one of"),
        (dict(init=torch.zeros(2, 3, 3)), r"init should be a \(B, k, D\) = \(2, 2, 3\)"),
        (dict(init=torch.zeros(2, 2, 3, dtype=torch.int64)), "init should be a floating tensor"),
        (dict(init=torch.full((2, 2, 3), float("nan"))), r"init should be finite, problems \[0, 1\]"),
        (dict(seed=1.5), "seed should be an int or None"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    args = dict(x=torch.rand(2, 4, 3), k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        K.kmeans(**args)
    with pytest.raises(ValueError, match=match):
        K.kmeans_reference(**args)


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
def test_compiled_op_checks_its_inputs():
    op = torch.ops.lesionkit.kmeans
    x = torch.rand(2, 5, 3)
    tol = torch.zeros(2)
    with pytest.raises(RuntimeError, match=r"init should be a \(B, k, D\) tensor"):
        op(x, torch.zeros(2, 2, 4), tol, 3)
    with pytest.raises(RuntimeError, match="init should be Float"):
        op(x, torch.zeros(2, 2, 3, dtype=torch.float64), tol, 3)
    with pytest.raises(RuntimeError, match=r"tol should be a \(B,\)"):
        op(x, torch.zeros(2, 2, 3), torch.zeros(3), 3)
    with pytest.raises(RuntimeError, match="iters should be >= 0"):
        op(x, torch.zeros(2, 2, 3), tol, -2)


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_compiled(dtype):
    x = blobs(3, 12, 4, dtype=dtype)
    init = kmeans_init(x, 2, "farthest")
    tol = kmeans_tolerance(x, 1e-4)
    torch.library.opcheck(torch.ops.lesionkit.kmeans.default, (x, init, tol, 10))
    torch.library.opcheck(torch.ops.lesionkit.kmeans.default, (x.requires_grad_(), init, tol, 10))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "triton"])
def test_opcheck_triton(backend, device):
    x = blobs(2, 9, 3, dtype=torch.float32, device=device)
    with K.use_backend("triton"):
        K.kmeans(x)  # registers the Triton op on first use
    init = kmeans_init(x, 2, "farthest")
    tol = kmeans_tolerance(x, 1e-4)
    # The Triton interpreter dereferences fake tensors: fake-tensor checks run on a GPU only.
    kwargs = {"test_utils": ("test_schema", "test_autograd_registration")} if device.type == "cpu" else {}
    torch.library.opcheck(torch.ops.lesionkit.kmeans_triton.default, (x, init, tol, 4), **kwargs)


try:  # the dev extra has it; without it only the property test below is skipped
    import hypothesis
    from hypothesis import strategies as st
except ImportError:
    hypothesis = None

if hypothesis is not None:
    st = hypothesis.strategies

def _property_test(test):
    if hypothesis is None:
        return pytest.mark.skip(reason="hypothesis is not installed (pip install -e '.[dev]')")(test)
    given = hypothesis.given(
        b=st.integers(1, 3), n=st.integers(1, 24), d=st.integers(1, 7), k=st.integers(1, 4),
        seed=st.integers(0, 2**31 - 1), init=st.sampled_from(["kmeans++", "farthest"]),
        tol=st.sampled_from([0.0, 1e-4, -1.0]), iters=st.integers(0, 12),
        grid=st.booleans(),
    )
    settings = hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                                   suppress_health_check=list(hypothesis.HealthCheck))
    return settings(given(test))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[1].type == "cpu"])
@_property_test
def test_property_compiled_and_reference_agree(backend, device, b, n, d, k, seed, init, tol, iters,
                                               grid):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    if grid:  # integer points: many duplicates and exact ties
        x = x.mul(1.5).round()
    got = run(backend, x, k=k, iters=iters, tol=tol, init=init, seed=seed)
    want = run("reference", x, k=k, iters=iters, tol=tol, init=init, seed=seed)
    # Invariants of every result.
    assert torch.isfinite(got.centroids).all() and (got.distances >= 0).all()
    assert ((got.n_iter >= 0) & (got.n_iter <= iters)).all()
    assert torch.equal(got.labels, got.distances.argmin(-1))
    if tol < 0:
        assert (got.n_iter == iters).all()
    # Agreement with the reference wherever no tie made the two diverge.
    diverged = ~((got.labels == want.labels) | near_ties(x, want.centroids, rel=1e-9)).all(dim=1)
    same = ~diverged & (got.n_iter == want.n_iter)
    torch.testing.assert_close(got.centroids[same], want.centroids[same], rtol=1e-9, atol=1e-9)
    if not grid:  # continuous data: ties have probability zero
        assert same.all()
