"""lesionkit's last-dimension LayerNorm (kernels.layer_norm_last, layers.LayerNorm): the float32
residual stream normalised straight to bf16 as autocast would, the layer equal to nn.LayerNorm
where it defers to it, and the SS2D models wired to the kernel under autocast."""

import pytest
import torch
from torch import nn

import lesionkit.kernels as K
from lesionkit.kernels import _library
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


@needs_ops
def test_opcheck_and_gradcheck():
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    with K.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *a: K.layer_norm_last(*a, 1e-5), (x, w, b))
    xf = torch.randn(3, 7, 24, requires_grad=True)
    wf, bf = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.lesionkit.layer_norm_last.default, (xf, wf, bf, 1e-5, torch.bfloat16))
    out, mean, rstd = torch.ops.lesionkit.layer_norm_last(xf, wf, bf, 1e-5, torch.bfloat16)
    torch.library.opcheck(torch.ops.lesionkit.layer_norm_last_backward.default,
                          (torch.randn_like(out), xf.detach(), wf.detach(), mean, rstd))


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
