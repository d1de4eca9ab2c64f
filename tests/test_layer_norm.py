"""lesionkit's last-dimension LayerNorm (kernels.layer_norm_last, layers.LayerNorm): the float32
residual stream normalised straight to bf16 as autocast would, the layer equal to nn.LayerNorm
where it defers to it, and the SS2D models wired to the kernel under autocast."""

import pytest
import torch
from torch import nn

import lesionkit.kernels as K
from lesionkit.kernels import _library
from lesionkit.kernels.layer_norm import channels_first_view
from lesionkit.layers.layer_norm import LayerNorm
from lesionkit.models import create_model

needs_ops = pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")


def _pair(channels=24, seed=0):
    torch.manual_seed(seed)
    ours, theirs = LayerNorm(channels), nn.LayerNorm(channels)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.3)
        ours.bias.normal_(0.0, 0.3)
    theirs.load_state_dict(ours.state_dict())  # same keys: checkpoints load either way
    return ours, theirs


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_layer_under_autocast_matches_nn_layernorm(in_dtype):
    """Same output dtype as PyTorch's LayerNorm under CPU bf16 autocast (the input's: autocast
    leaves layer_norm alone), values and gradients within bf16 rounding; at least as close to
    float64 as PyTorch's."""
    ours, theirs = _pair()
    x0 = (3 * torch.randn(4, 8, 8, 24) + 1).to(in_dtype)
    cotangent = torch.randn(4, 8, 8, 24).bfloat16()
    results = []
    for layer in (ours, theirs):
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        grads = torch.autograd.grad(out, [x, layer.weight, layer.bias], cotangent)
        results.append((out, grads))
    (got, got_grads), (want, want_grads) = results
    assert got.dtype == want.dtype == in_dtype
    exact = nn.functional.layer_norm(x0.double(), (24,), theirs.weight.double(), theirs.bias.double(), 1e-5)
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() + 1e-6
    tol = (1e-5, 1e-5) if in_dtype == torch.float32 else (2e-2, 3e-2)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol[0], atol=tol[1])
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=5e-2 * w.float().abs().max().item())


def test_layer_without_autocast_in_float32_is_nn_layernorm():
    ours, theirs = _pair(seed=1)
    x = torch.randn(3, 5, 24)
    assert torch.equal(ours(x), theirs(x))


@needs_ops
def test_float32_input_to_bfloat16_output_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(300, 48, generator=g) + 0.5).requires_grad_()
    w, b = torch.randn(48, generator=g).requires_grad_(), torch.randn(48, generator=g).requires_grad_()
    cotangent = torch.randn(300, 48, generator=g).bfloat16()
    with K.use_backend("cpu"):
        got = K.layer_norm_last(x, w, b, 1e-5, torch.bfloat16)
    want = K.layer_norm_last_reference(x, w, b, 1e-5, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.02)
    for a, c in zip(torch.autograd.grad(got, (x, w, b), cotangent), torch.autograd.grad(want, (x, w, b), cotangent)):
        assert a.dtype == c.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def _opcheck_forward_and_backward(x, out_dtype):
    """torch.library.opcheck of the op and of its backward on x (..., 24) with random weights."""
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.lesionkit.layer_norm_last.default, (x, w, b, 1e-5, out_dtype))
    out, mean, rstd = torch.ops.lesionkit.layer_norm_last(x, w, b, 1e-5, out_dtype)
    torch.library.opcheck(torch.ops.lesionkit.layer_norm_last_backward.default,
                          (torch.randn_like(out), x.detach(), w.detach(), mean, rstd))


@needs_ops
def test_opcheck_and_gradcheck():
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    with K.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *a: K.layer_norm_last(*a, 1e-5), (x, w, b))
    _opcheck_forward_and_backward(torch.randn(3, 7, 24, requires_grad=True), torch.bfloat16)


@needs_ops
@pytest.mark.parametrize("name", ["vmunet_tiny", "cmssm_tiny"])
def test_ss2d_models_take_the_kernel_under_autocast(name):
    """Every LayerNorm of the SS2D models is lesionkit's, and under bf16 autocast on a CPU their
    forward runs the kernel (a fallback to PyTorch's LayerNorm would go unnoticed otherwise)."""
    model = create_model(name)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(isinstance(m, LayerNorm) for m in norms)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            model(torch.rand(1, 3, 64, 64))
    names = [e.name for e in prof.events()]
    assert names.count("lesionkit::layer_norm_last") >= len(norms) - 1  # the final expand's norm is channels-first
    assert "aten::native_layer_norm" not in names


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 48, 8, 8), (3, 24, 5, 7), (2, 5, 1, 33)])  # 64, 35, 33 positions: tiles of 16 and tails
def test_channels_first_view_is_read_in_place(dtype, shape):
    """x = y.permute(0, 2, 3, 1) of a contiguous (B, C, H, W) y, as SS2D's out_norm receives the
    scan's output: the kernel reads it without a copy, matches the float64 LayerNorm, writes
    contiguous rows, and returns dx in y's channels-first layout (so the scan's backward needs no
    copy either)."""
    g = torch.Generator().manual_seed(sum(shape))
    batch, channels, height, width = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    y = (3 * torch.randn(shape, generator=g) + 1).to(dtype).requires_grad_()
    w = torch.randn(channels, generator=g, dtype=acc).requires_grad_()
    b = torch.randn(channels, generator=g, dtype=acc).requires_grad_()
    x = y.permute(0, 2, 3, 1)
    with K.use_backend("cpu"):
        out = K.layer_norm_last(x, w, b, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    cotangent = torch.randn(out.shape, generator=g).to(dtype)
    dy, dw, db = torch.autograd.grad(out, (y, w, b), cotangent)
    assert dy.stride() == y.stride()
    y64 = y.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = nn.functional.layer_norm(y64.permute(0, 2, 3, 1), (channels,), w64, b64, 1e-5)
    want_grads = torch.autograd.grad(want, (y64, w64, b64), cotangent.double())
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    for got_g, want_g in zip((dy, dw, db), want_grads):
        torch.testing.assert_close(got_g.double(), want_g, rtol=tol, atol=tol * want_g.abs().max().item())


@needs_ops
def test_channels_first_view_opcheck_and_gradcheck():
    y = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    x = y.permute(0, 2, 3, 1).requires_grad_()
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert channels_first_view(x)
    with K.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *a: K.layer_norm_last(*a, 1e-5), (x, w, b))
    _opcheck_forward_and_backward(torch.randn(2, 24, 4, 5).permute(0, 2, 3, 1).requires_grad_(), torch.float32)


@needs_ops
def test_float32_ss2d_out_norm_takes_the_kernel_on_channels_first_input():
    """In float32 the layer defers to nn.LayerNorm on rows, and takes the kernel only where its
    input is a channels-first view (SS2D's out_norm): vmunet_tiny's forward runs it at least once
    per SS2D layer, every out_norm sees such a view, and the output is nn.LayerNorm's."""
    model = create_model("vmunet_tiny").eval()
    ss2d = [m for m in model.modules() if type(m).__name__ == "SS2D"]
    assert ss2d
    seen = []
    for m in ss2d:
        m.out_norm.register_forward_pre_hook(lambda _m, args: seen.append(channels_first_view(args[0])))
    x = torch.rand(1, 3, 64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        got = model(x)
    assert seen == [True] * len(ss2d)
    names = [e.name for e in prof.events()]
    # one per SS2D layer, and any other LayerNorm that sees a channels-first view
    assert names.count("lesionkit::layer_norm_last") >= len(ss2d)
    for m in model.modules():  # the same model with every LayerNorm PyTorch's
        if isinstance(m, LayerNorm):
            m.__class__ = nn.LayerNorm
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
