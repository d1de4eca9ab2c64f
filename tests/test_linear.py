"""float32 CPU products through oneDNN (lesionkit.layers.linear): values and gradients against
PyTorch's own ops, which calls take that path and which must not, and the backend choice."""

import pytest
import torch
from torch import nn

from lesionkit.layers import linear as L
from lesionkit.layers.ss2d import SS2D

needs_onednn = pytest.mark.skipif(not L._onednn_available(), reason="this torch has no oneDNN linear")


@pytest.fixture
def backend():
    yield L.set_fp32_matmul_backend
    L.set_fp32_matmul_backend(None)


def _grads(fn, backend_name, inputs, grad):
    L.set_fp32_matmul_backend(backend_name)
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], grad)
    return (out, *grads)


@needs_onednn
@pytest.mark.parametrize("lead,k,n,bias", [((2, 33, 40), 96, 384, True), ((4096,), 192, 96, False),
                                          ((3, 700), 384, 40, True)])
def test_linear_matches_aten(backend, lead, k, n, bias):
    """Both weight-gradient layouts (K <= N copies x^T, K > N copies dy^T) and a bias."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, k, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g, requires_grad=True)
    b = torch.randn(n, generator=g, requires_grad=True) if bias else None
    dy = torch.randn(*lead, n, generator=g)
    ref = _grads(L.linear, "aten", (x, w, b), dy)
    got = _grads(L.linear, "onednn", (x, w, b), dy)
    assert got[0].grad_fn.name().startswith("_LinearFn")
    for r, o in zip(ref, got):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-3)


@needs_onednn
def test_bmm_matches_aten_with_a_shared_weight(backend):
    """As SS2D's x_proj calls it: one weight expanded over the batch (its gradient is summed)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g, requires_grad=True)
    x = torch.randn(3, 96, 1024, generator=g, requires_grad=True)
    dy = torch.randn(3, 48, 1024, generator=g)

    def fn(w, x):
        return L.bmm(w.unsqueeze(0).expand(3, 48, 96), x)

    ref = _grads(fn, "aten", (w, x), dy)
    got = _grads(fn, "onednn", (w, x), dy)
    assert got[0].grad_fn.name().startswith("_BmmFn")
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-3)


@needs_onednn
def test_what_stays_on_pytorchs_path(backend):
    backend("onednn")
    w = torch.randn(384, 96, requires_grad=True)
    x = torch.randn(64, 96, requires_grad=True)  # 2.4M multiply-adds: below MIN_MACS
    assert not L.linear(x, w).grad_fn.name().startswith("_LinearFn")
    big = torch.randn(4096, 96, requires_grad=True)
    assert L.linear(big, w).grad_fn.name().startswith("_LinearFn")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts, as F.linear does
        y = L.linear(big, w)
    assert y.dtype == torch.bfloat16
    assert not L.linear(big.double(), w.double()).grad_fn.name().startswith("_LinearFn")
    torch.backends.mkldnn.enabled = False  # the user switched oneDNN off
    try:
        assert not L.linear(big, w).grad_fn.name().startswith("_LinearFn")
    finally:
        torch.backends.mkldnn.enabled = True
    backend("aten")
    assert not L.linear(big, w).grad_fn.name().startswith("_LinearFn")


@needs_onednn
def test_ss2d_takes_the_onednn_path_and_keeps_its_values(backend):
    """SS2D's in_proj, x_proj, dt_proj and out_proj all go through oneDNN, same outputs and grads."""
    torch.manual_seed(0)
    layer = SS2D(d_model=32, d_state=8, dt_rank=64)  # every product above MIN_MACS
    x = torch.randn(2, 32, 32, 32, requires_grad=True)
    dy = torch.randn(2, 32, 32, 32)
    seen = []
    L.set_fp32_matmul_backend("onednn")
    orig_linear, orig_bmm = L._LinearFn.apply, L._BmmFn.apply
    try:
        L._LinearFn.apply = lambda *a: seen.append("linear") or orig_linear(*a)
        L._BmmFn.apply = lambda *a: seen.append("bmm") or orig_bmm(*a)
        got = _grads(lambda t, *params: layer(t), "onednn", (x, *layer.parameters()), dy)
    finally:
        L._LinearFn.apply, L._BmmFn.apply = orig_linear, orig_bmm
    assert seen.count("linear") == 2 and seen.count("bmm") == 2
    ref = _grads(lambda t, *params: layer(t), "aten", (x, *layer.parameters()), dy)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("graph", ["torch.jit.is_tracing", "torch.compiler.is_compiling",
                                   "torch.onnx.is_in_onnx_export"])
def test_graph_capture_sees_the_plain_ops(backend, monkeypatch, graph):
    """Tracing, torch.compile and ONNX export record aten's linear / bmm, not the oneDNN call."""
    backend("onednn")
    x, w = torch.randn(4096, 96, requires_grad=True), torch.randn(384, 96)
    a, b = torch.randn(2, 96, 4096), torch.randn(2, 4096, 96)
    assert L.linear(x, w).grad_fn.name().startswith("_LinearFn")
    module, _, name = graph.rpartition(".")
    monkeypatch.setattr(eval(module), name, lambda: True)
    assert not L.linear(x, w).grad_fn.name().startswith("_LinearFn")
    assert not L.bmm(a.requires_grad_(), b).grad_fn.name().startswith("_BmmFn")


@needs_onednn
def test_torch_export_records_aten_linear(backend):
    backend("onednn")
    program = torch.export.export(nn.Sequential(L.Linear(96, 384)).eval(), (torch.randn(4096, 96),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets == ["aten.linear.default"]


def test_linear_module_is_an_nn_linear():
    torch.manual_seed(0)
    a = L.Linear(8, 4)
    torch.manual_seed(0)
    b = nn.Linear(8, 4)
    assert isinstance(a, nn.Linear)
    assert a.state_dict().keys() == b.state_dict().keys()
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])


def test_backend_choice(backend, monkeypatch):
    with pytest.raises(ValueError, match="fp32 matmul backend"):
        backend("mkl")
    backend(None)
    monkeypatch.setenv("LESIONKIT_FP32_MATMUL", "fast")
    with pytest.raises(ValueError, match="LESIONKIT_FP32_MATMUL"):
        L.fp32_matmul_backend()
    monkeypatch.setenv("LESIONKIT_FP32_MATMUL", "aten")
    assert L.fp32_matmul_backend() == "aten"
    monkeypatch.setenv("LESIONKIT_FP32_MATMUL", "auto")
    monkeypatch.setattr(L.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(L, "_onednn_available", lambda: True)
    for vendor, family, flags, expected in [("AuthenticAMD", 26, {"avx2", "avx512f"}, "onednn"),  # Zen 5
                                            ("AuthenticAMD", 25, {"avx2", "avx512f"}, "aten"),  # Zen 4
                                            ("AuthenticAMD", 26, {"avx2"}, "aten"),
                                            ("GenuineIntel", 6, {"avx2", "avx512f"}, "aten"),
                                            ("", 0, set(), "aten")]:
        monkeypatch.setattr(L, "_cpu_flags", lambda v=vendor, c=family, f=flags: (v, c, frozenset(f)))
        assert L.fp32_matmul_backend() == expected, (vendor, family, flags)
    monkeypatch.setattr(L.platform, "machine", lambda: "arm64")
    assert L.fp32_matmul_backend() == "aten"


@needs_onednn
def test_create_model_converts_timm_linears(backend):
    """create_model turns the plain nn.Linear layers of timm's ViT blocks into Linear, and they run on oneDNN."""
    from lesionkit.models import create_model

    torch.manual_seed(0)
    model = create_model("transunet_tiny")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and type(m).__name__ != "NonDynamicallyQuantizableLinear"]
    assert linears and all(type(m) is L.Linear for m in linears)
    calls = []
    orig = L._LinearFn.apply
    backend("onednn")
    try:
        L._LinearFn.apply = lambda *a: calls.append(a[0].shape) or orig(*a)
        model(torch.rand(2, 3, 128, 128))
    finally:
        L._LinearFn.apply = orig
    assert len(calls) >= len(linears) // 2  # the ViT's qkv / proj / fc1 / fc2 (the smallest stay on aten)


def test_use_fp32_matmul_backend_restores_the_previous_choice(backend):
    backend("aten")
    with L.use_fp32_matmul_backend(None):
        assert L._requested()[1] == "LESIONKIT_FP32_MATMUL"
        with pytest.raises(RuntimeError):
            with L.use_fp32_matmul_backend("aten"):
                assert L.fp32_matmul_backend() == "aten"
                raise RuntimeError
        assert L._requested()[1] == "LESIONKIT_FP32_MATMUL"
    assert L._requested() == ("aten", "set_fp32_matmul_backend")
