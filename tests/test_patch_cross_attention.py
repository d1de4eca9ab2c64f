"""patch_cross_attention on every backend against its reference (STYLE rule 6)."""

import math

import pytest
import torch
try:  # a bare GPU image may lack hypothesis: then only the property test skips, not the file
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

import lesionkit.kernels as K
from lesionkit.kernels import _library
from lesionkit.kernels.reference.patch_cross_attention import (
    patch_cross_attention_reference,
    patch_cross_attention_with_lse_reference,
)

from conftest import backend_params

OP = "patch_cross_attention"
BACKENDS = backend_params(OP)
BACKENDS_AND_REF = BACKENDS + [pytest.param("reference", torch.device("cpu"), id="reference")]

# (B, h, dk, dv, H, W, P): dk != dv, a single window, non-square maps, patch sizes that are not
# powers of two (T = 9, 25), dk = 1, P = 1 (each query sees only itself) and P = 16 (T = 256).
SHAPES = [
    (2, 1, 8, 8, 16, 24, 8),
    (1, 2, 5, 7, 12, 18, 3),
    (3, 1, 1, 3, 4, 4, 4),
    (2, 3, 6, 6, 5, 10, 5),
    (1, 1, 3, 2, 3, 2, 1),
    (1, 1, 16, 4, 16, 32, 16),
]
# (rtol, atol) per dtype (docs/ops.md); low-precision inputs are rounded the same way on every
# backend and accumulate in float32, so only the output rounding differs.
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12),
       torch.bfloat16: (5e-2, 1e-2), torch.float16: (5e-2, 1e-2)}


def make_inputs(shape, dtype, device, seed=0, noncontiguous=False, magnitude=1.0):
    b, h, dk, dv, height, width, _ = shape
    gen = torch.Generator().manual_seed(seed)

    def one(d):
        if noncontiguous:  # same logical shape, W and H swapped in storage
            x = torch.randn(b, h, d, width, height, generator=gen).transpose(-1, -2)
        else:
            x = torch.randn(b, h, d, height, width, generator=gen)
        return (x * magnitude).to(device, dtype)

    return one(dk), one(dk), one(dv)


def run(backend, *args, **kwargs):
    with K.use_backend(backend):
        return K.patch_cross_attention(*args, **kwargs)


def interpreted(backend, device):
    return backend == "triton" and device.type == "cpu"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["plain", "noncontiguous"])
def test_forward_matches_reference(backend, device, dtype, shape, variant):
    q, k, v = make_inputs(shape, dtype, device, noncontiguous=variant == "noncontiguous")
    got = run(backend, q, k, v, shape[-1])
    want = run("reference", q, k, v, shape[-1])
    assert got.dtype == dtype and got.shape == v.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_op_returns_the_log_sum_exp(dtype):
    shape = SHAPES[1]
    q, k, v = make_inputs(shape, dtype, "cpu", seed=1)
    out, lse = torch.ops.lesionkit.patch_cross_attention(q, k, v, 3, 0.4)
    want_out, want_lse = patch_cross_attention_with_lse_reference(q, k, v, 3, 0.4)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 12, 18)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), want_out.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", [None, 0.7])
def test_gradients_match_reference(backend, device, shape, scale):
    # P = 16 (T = 256) runs the tiled Triton kernels over several query and key blocks.
    q, k, v = make_inputs(shape, torch.float32, device, seed=2, noncontiguous=True)
    weight = torch.randn(v.shape, generator=torch.Generator().manual_seed(3)).to(device)
    grads = []
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = run(name, *leaves, shape[-1], scale=scale)
        grads.append(torch.autograd.grad((out * weight).sum(), leaves))
    # Compared relative to the largest gradient: with P = 1, dq and dk are zero up to rounding.
    scale_max = max(want.abs().max() for want in grads[1])
    for got, want in zip(*grads):
        torch.testing.assert_close(got / scale_max, want / scale_max, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_reference_error(backend, device, dtype):
    # flash-attention's rule: the kernel's error against a float64 oracle may be at most a small
    # multiple of the same-dtype reference's own error.
    shape = (2, 2, 16, 16, 16, 16, 8)
    q, k, v = make_inputs(shape, dtype, device, seed=4, magnitude=2.0)
    exact = run("reference", q.double(), k.double(), v.double(), 8)
    got_err = (run(backend, q, k, v, 8).double() - exact).abs().max().item()
    ref_err = (run("reference", q, k, v, 8).double() - exact).abs().max().item()
    assert got_err <= 2 * ref_err + 4 * torch.finfo(dtype).eps * exact.abs().max().item()


@pytest.mark.parametrize("backend,device", BACKENDS_AND_REF)
def test_gradcheck_float64(backend, device):
    fast = interpreted(backend, device)
    shape = (1, 1, 3, 2, 4, 4, 2) if fast else (2, 2, 3, 4, 6, 4, 2)
    q, k, v = (t.requires_grad_() for t in make_inputs(shape, torch.float64, device, seed=5))

    def fn(q, k, v):
        return run(backend, q, k, v, 2, scale=0.8)

    # The Triton interpreter is slow: there, gradcheck's fast mode (random projections).
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("backend,device", BACKENDS_AND_REF)
def test_large_logits_stay_finite(backend, device):
    # Softmax with the row max subtracted: logits of order 1e4 must not overflow.
    q, k, v = make_inputs((1, 1, 4, 4, 8, 8, 4), torch.float32, device, seed=6, magnitude=100.0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = run(backend, *leaves, 4)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), leaves))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS_AND_REF if p.values[0] != "triton"])
def test_more_windows_than_a_grid_dimension_holds(backend, device):
    # 66,049 windows of one pixel (> 65,535): P = 1 attention returns v exactly.
    q, k, v = make_inputs((1, 1, 1, 2, 257, 257, 1), torch.float32, device, seed=7)
    torch.testing.assert_close(run(backend, q, k, v, 1), v)


def test_windows_do_not_mix():
    # Changing one window's keys changes that window's output only.
    q, k, v = make_inputs((1, 1, 4, 4, 8, 8, 4), torch.float64, "cpu", seed=8)
    base = K.patch_cross_attention(q, k, v, 4)
    k2 = k.clone()
    # (adding the same vector to every key would shift each query's scores by a constant)
    k2[..., :4, 4:] += torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    changed = K.patch_cross_attention(q, k2, v, 4) != base
    assert changed[..., :4, 4:].all() and not changed[..., :4, :4].any()
    assert not changed[..., 4:, :].any()


def test_reference_matches_a_direct_transcription():
    # Attention written out window by window with Python loops: an oracle independent of the
    # reference's view / permute.
    shape = (2, 1, 3, 2, 4, 6, 2)
    q, k, v = make_inputs(shape, torch.float64, "cpu", seed=9)
    want = torch.empty_like(v)
    for b in range(2):
        for r in range(2):
            for c in range(3):
                ys, xs = slice(2 * r, 2 * r + 2), slice(2 * c, 2 * c + 2)
                qw = q[b, 0, :, ys, xs].reshape(3, 4).T
                kw = k[b, 0, :, ys, xs].reshape(3, 4).T
                vw = v[b, 0, :, ys, xs].reshape(2, 4).T
                attn = torch.softmax(qw @ kw.T / math.sqrt(3), dim=-1)
                want[b, 0, :, ys, xs] = (attn @ vw).T.reshape(2, 2, 2)
    torch.testing.assert_close(K.patch_cross_attention_reference(q, k, v, 2), want)


if given is not None:

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(
        batch=st.integers(1, 2), heads=st.integers(1, 2), dk=st.integers(1, 9), dv=st.integers(1, 9),
        patch=st.integers(1, 6), rows=st.integers(1, 3), cols=st.integers(1, 3),
        scale=st.one_of(st.none(), st.floats(0.05, 2.0)), seed=st.integers(0, 2**16),
    )
    def test_property_matches_reference(batch, heads, dk, dv, patch, rows, cols, scale, seed):
        # Forward and gradients of the auto-selected backend equal the reference on random shapes.
        shape = (batch, heads, dk, dv, rows * patch, cols * patch, patch)
        q, k, v = make_inputs(shape, torch.float64, "cpu", seed=seed)
        results = []
        for name in ("auto", "reference"):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = run(name, *leaves, patch, scale=scale)
            results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
else:

    @pytest.mark.skip(reason="needs hypothesis")
    def test_property_matches_reference():
        pass


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    q = torch.zeros(0, 1, 2, 8, 8, device=device)
    assert run(backend, q, q, q, 4).shape == (0, 1, 2, 8, 8)


def test_mixed_dtypes_are_promoted():
    q, k, v = make_inputs(SHAPES[0], torch.float32, "cpu")
    got = K.patch_cross_attention(q, k.double(), v, 8)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), K.patch_cross_attention(q, k, v, 8))


def _bad(**kwargs):
    args = dict(q=torch.zeros(2, 1, 4, 8, 8), k=torch.zeros(2, 1, 4, 8, 8),
                v=torch.zeros(2, 1, 3, 8, 8), patch_size=4)
    args.update(kwargs)
    return args


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch_size=3), "positive multiples of patch_size=3, got H=8, W=8"),
        (dict(patch_size=0), "patch_size should be a positive int, got 0"),
        (dict(patch_size=2.0), "patch_size should be a positive int"),
        (dict(q=torch.zeros(2, 4, 8, 8)), r"q should be a \(B, h, dk, H, W\) tensor"),
        (dict(k=torch.zeros(2, 1, 5, 8, 8)), r"q and k should have the same shape.*\(2, 1, 5, 8, 8\)"),
        (dict(k=torch.zeros(2, 2, 4, 8, 8)), "q and k should have the same shape"),
        (dict(v=torch.zeros(2, 2, 3, 8, 8)), r"v should match q in B, h, H, W.*\(2, 2, 3, 8, 8\)"),
        (dict(v=torch.zeros(2, 1, 3, 8, 4)), "v should match q in B, h, H, W"),
        (dict(v=torch.zeros(2, 1, 3, 8, 8, dtype=torch.int64)), "floating tensors.*torch.int64"),
        (dict(v=torch.zeros(2, 1, 3, 8, 8, device="meta")), "same device, got cpu, cpu and meta"),
        (dict(q=torch.zeros(2, 1, 0, 8, 8), k=torch.zeros(2, 1, 0, 8, 8)), "dk=0"),
        (dict(scale=float("nan")), "scale should be a finite number"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        K.patch_cross_attention(**_bad(**kwargs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to hold a second device")
def test_devices_must_match():
    with pytest.raises(ValueError, match="same device"):
        K.patch_cross_attention(**_bad(v=torch.zeros(2, 1, 3, 8, 8, device="cuda")))


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
def test_compiled_op_checks_its_inputs():
    # A direct torch.ops call (no Python wrapper) still gets a message naming the argument.
    op = torch.ops.lesionkit.patch_cross_attention
    x = torch.zeros(1, 1, 2, 8, 8)
    with pytest.raises(RuntimeError, match="multiples of patch_size=3, got H=8, W=8"):
        op(x, x, x, 3, 1.0)
    with pytest.raises(RuntimeError, match="q and k should have the same shape"):
        op(x, torch.zeros(1, 1, 3, 8, 8), x, 4, 1.0)
    with pytest.raises(RuntimeError, match="v should match q in B, h, H, W"):
        op(x, x, torch.zeros(1, 2, 2, 8, 8), 4, 1.0)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(x, x, x.double(), 4, 1.0)
    out, lse = op(x, x, x, 4, 1.0)
    with pytest.raises(RuntimeError, match="lse should be a Float tensor of shape"):
        torch.ops.lesionkit.patch_cross_attention_backward(out, x, x, x, out, lse.double(), 4, 1.0)


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
def test_opcheck_compiled():
    q, k, v = make_inputs((2, 2, 3, 5, 8, 12, 4), torch.float32, "cpu")
    q.requires_grad_()
    torch.library.opcheck(torch.ops.lesionkit.patch_cross_attention.default, (q, k, v, 4, 0.5))
    out, lse = torch.ops.lesionkit.patch_cross_attention(q, k, v, 4, 0.5)
    torch.library.opcheck(torch.ops.lesionkit.patch_cross_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k, v, out.detach(), lse, 4, 0.5))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "triton"])
def test_opcheck_triton(backend, device):
    q, k, v = make_inputs((1, 1, 3, 5, 8, 8, 4), torch.float32, device)
    q.requires_grad_()
    with K.use_backend("triton"):
        K.patch_cross_attention(q, k, v, 4)  # registers the Triton op on first use
    # The Triton interpreter dereferences fake tensors, so the fake-tensor and compile checks
    # of opcheck run on a GPU only.
    kwargs = {"test_utils": ("test_schema", "test_autograd_registration")} if device.type == "cpu" else {}
    torch.library.opcheck(torch.ops.lesionkit.patch_cross_attention_triton.default,
                          (q, k, v, 4, 0.5), **kwargs)


# The Triton interpreter cannot run inside a compiled graph; on a GPU Triton is compiled too.
COMPILABLE = [p for p in BACKENDS_AND_REF if p.values[1].type == "cuda" or p.values[0] != "triton"]


@pytest.mark.parametrize("backend,device", COMPILABLE)
def test_torch_compile_fullgraph(backend, device):
    q, k, v = make_inputs((2, 2, 4, 3, 8, 12, 4), torch.float32, device, seed=10)

    def step(q, k, v):
        return K.patch_cross_attention(q * 1.5, k, v, 4).square().sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with K.use_backend(backend):
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with K.use_backend("reference"):
        want = step(*ref_leaves)
    want_grads = torch.autograd.grad(want, ref_leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# --- patch_cross_attention_mix: M key sets over one q and v (GRCSF's two residual maps) -------

def make_mix_inputs(maps=2, dtype=torch.float32, seed=20):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 3, 8, 12, generator=g).to(dtype)
    k = torch.randn(maps, 2, 2, 3, 8, 12, generator=g).to(dtype)
    v = torch.randn(2, 2, 5, 8, 12, generator=g).to(dtype)
    w = torch.tensor([0.7, -0.3, 1.2][:maps])
    return q, k, v, w


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if _library.HAS_OPS else []))
def test_mix_is_the_weighted_sum_of_single_attentions(backend):
    """out = sum_m w_m attn(q, k_m, v) and so are its gradients, including those of the weights."""
    q, k, v, w = make_mix_inputs(maps=3, dtype=torch.float64)
    got_leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    with K.use_backend(backend):
        got = K.patch_cross_attention_mix(*got_leaves, 4, 0.8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    want = sum(leaves[3][m] * patch_cross_attention_reference(leaves[0], leaves[1][m], leaves[2], 4, 0.8)
               for m in range(3))
    cotangent = torch.randn_like(want)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, got_leaves, cotangent), torch.autograd.grad(want, leaves, cotangent)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
def test_mix_gradcheck_float64():
    q, k, v, w = (t.double().requires_grad_() for t in make_mix_inputs())
    with K.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *a: K.patch_cross_attention_mix(*a, 4), (q, k, v, w))


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
def test_mix_compiled_op_checks_its_inputs_and_passes_opcheck():
    op = torch.ops.lesionkit.patch_cross_attention_mix
    q, k, v, w = make_mix_inputs()
    with pytest.raises(RuntimeError, match=r"k should be a \(M, B, h, dk, H, W\)"):
        op(q, k[0], v, w, 4, 1.0)
    with pytest.raises(RuntimeError, match=r"weights should be a Float tensor of shape \(2,\)"):
        op(q, k, v, w[:1], 4, 1.0)
    with pytest.raises(RuntimeError, match="weights should be a Float tensor"):
        op(q, k, v, w.double(), 4, 1.0)
    out, lse = op(q, k, v, w, 4, 1.0)
    assert lse.shape == (2, 2, 2, 8, 12) and lse.dtype == torch.float32
    with pytest.raises(RuntimeError, match="lse should be a Float tensor of shape"):
        torch.ops.lesionkit.patch_cross_attention_mix_backward(out, q, k, v, w, lse[:1], 4, 1.0)
    q.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(op.default, (q, k, v, w, 4, 0.5))
    torch.library.opcheck(torch.ops.lesionkit.patch_cross_attention_mix_backward.default,
                          (torch.randn_like(out), q.detach(), k, v, w.detach(), lse, 4, 1.0))


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if _library.HAS_OPS else []))
def test_mix_torch_compile_fullgraph(backend):
    q, k, v, w = make_mix_inputs()

    def step(q, k, v, w):
        return K.patch_cross_attention_mix(q * 1.5, k, v, w, 4).square().sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    with K.use_backend(backend):
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    with K.use_backend("reference"):
        want = step(*ref_leaves)
    for a, b in zip((got, *got_grads), (want, *torch.autograd.grad(want, ref_leaves))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mix_reads_and_writes_channels_last_views(dtype):
    """Views of channels-last (B, h*d, H, W) tensors, as the RCU's 1x1 projections give them, go
    in without a copy and the output and gradients come back in the same layout, same values."""
    q, k, v, w = make_mix_inputs(dtype=dtype)

    def channels_last_view(t):  # (..., B, h, d, H, W) -> the same values, channels fastest
        _, h, d, height, width = t.shape[-5:]
        flat = t.reshape(-1, h * d, height, width).contiguous(memory_format=torch.channels_last)
        return flat.reshape(t.shape)

    views = [channels_last_view(q), channels_last_view(k), channels_last_view(v)]
    assert views[0].stride(2) == 1 and views[2].stride(2) == 1 and views[1].stride(3) == 1
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    cl_leaves = [views[0].detach().requires_grad_(), views[1].detach().requires_grad_(),
                 views[2].detach().requires_grad_(), w.clone().requires_grad_()]
    with K.use_backend("cpu"):
        want = K.patch_cross_attention_mix(*leaves, 4)
        got = K.patch_cross_attention_mix(*cl_leaves, 4)
    assert got.stride() == views[2].stride()
    cotangent = channels_last_view(torch.randn_like(want))
    grads = torch.autograd.grad(got, cl_leaves, cotangent)
    for g, x in zip(grads[:3], cl_leaves[:3]):
        assert g.stride() == x.stride()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(grads, torch.autograd.grad(want, leaves, cotangent.contiguous())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
