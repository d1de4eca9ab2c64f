"""The scans in the regimes models use and at their chunk boundaries.

- S4D-real initialisation: A in [-16, -1] with softplus'd dt of a realistic size (~1e-2), where
  the decay exp(dt A) is far from the test suite's usual A in (-0.5, 0].
- ``selective_scan_2d(dt_softplus=False)``.
- float16 / bfloat16 backward of both scans, by flash-attention's rule: the kernel's gradient
  error against the float64 oracle is at most twice that of the reference run in the same dtype.
- a float64 gradcheck of the 2D scan whose sequences span more than one 512-step chunk, and
  lengths just below, at and above the chunk.
"""

import pytest
import torch

import lesionkit.kernels as K

from conftest import backend_params

SCAN_BACKENDS = backend_params("selective_scan")
SCAN_2D_BACKENDS = backend_params("selective_scan_2d")
REF_BACKEND = pytest.param("reference", torch.device("cpu"), id="reference")


def s4d_scan_inputs(b, d, length, n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    A = -(1 + 15 * torch.rand(d, n, generator=g, dtype=torch.float64))
    return dict(u=torch.randn(b, d, length, generator=g).to(device, dtype),
                delta=(torch.randn(b, d, length, generator=g) - 4.6).to(device, dtype),  # softplus -> ~1e-2
                A=A.to(device, acc), B=torch.randn(b, 2, n, length, generator=g).to(device, dtype),
                C=torch.randn(b, 2, n, length, generator=g).to(device, dtype),
                D=torch.randn(d, generator=g).to(device, acc), z=torch.randn(b, d, length, generator=g).to(device, dtype),
                delta_bias=torch.zeros(d).to(device, acc), delta_softplus=True)


def s4d_2d_inputs(b, d, h, w, n, dtype, device, seed, softplus=True):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    A = -(1 + 15 * torch.rand(4, d, n, generator=g, dtype=torch.float64))
    if softplus:
        dt = torch.randn(b, 4, d, h, w, generator=g) - 4.6
    else:  # already a step size, as a model that applies its own softplus passes it
        dt = torch.exp(torch.empty(b, 4, d, h, w).uniform_(-6.9, -2.3, generator=g))
    return dict(x=torch.randn(b, d, h, w, generator=g).to(device, dtype), dt=dt.to(device, dtype), A=A.to(device, acc),
                B=torch.randn(b, 4, n, h, w, generator=g).to(device, dtype),
                C=torch.randn(b, 4, n, h, w, generator=g).to(device, dtype),
                D=torch.randn(4, d, generator=g).to(device, acc), dt_bias=torch.zeros(4, d).to(device, acc),
                dt_softplus=softplus)


def _grads(fn, backend, kw, names):
    kw = {k: (v.detach().clone().requires_grad_() if k in names else v) for k, v in kw.items()}
    with K.use_backend(backend):
        out = fn(**kw)
    out = out[0] if isinstance(out, tuple) else out
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    return out, torch.autograd.grad(out, [kw[k] for k in names], cot)


def _as64(kw):
    return {k: (v.cpu().double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("backend,device", SCAN_BACKENDS)
def test_scan_s4d_regime_matches_float64(backend, device):
    kw = s4d_scan_inputs(2, 4, 700, 16, torch.float32, device, seed=3)
    names = ["u", "delta", "A", "B", "C", "D", "z"]
    got, got_g = _grads(K.selective_scan, backend, kw, names)
    want, want_g = _grads(K.selective_scan, "reference", _as64(kw), names)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5)
    for name, g, w in zip(names, got_g, want_g):
        # Elementwise, relative to each element's own size (plus a floor at 1e-4 of the largest).
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-3, atol=1e-4 * w.abs().max().item(),
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend,device", SCAN_2D_BACKENDS + [REF_BACKEND])
@pytest.mark.parametrize("softplus", [True, False])
def test_2d_s4d_regime_and_dt_softplus_off(backend, device, softplus):
    kw = s4d_2d_inputs(1, 3, 9, 11, 16, torch.float32, device, seed=4, softplus=softplus)
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"]
    got, got_g = _grads(K.selective_scan_2d, backend, kw, names)
    want, want_g = _grads(K.selective_scan_2d, "reference", _as64(kw), names)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5)
    for name, g, w in zip(names, got_g, want_g):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-3, atol=1e-4 * w.abs().max().item(),
                                   msg=lambda m, name=name: f"d{name}: {m}")


def _low_precision_grad_errors(fn, backend, kw64, names, dtype, device):
    """Max |grad - float64 grad| per input for `backend` and for the reference, both in `dtype`."""
    low = {k: (v.to(device, dtype) if isinstance(v, torch.Tensor) and v.dtype == torch.float64 and k not in
               ("A", "D", "delta_bias", "dt_bias") else v.to(device, torch.float32) if isinstance(v, torch.Tensor)
               else v) for k, v in kw64.items()}
    _, exact = _grads(fn, "reference", kw64, names)
    _, ours = _grads(fn, backend, low, names)
    _, ref = _grads(fn, "reference", {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in low.items()}, names)
    return [((o.cpu().double() - e).abs().max().item(), (r.double() - e).abs().max().item(), e.abs().max().item())
            for o, r, e in zip(ours, ref, exact)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend,device", SCAN_BACKENDS)
def test_scan_low_precision_backward(backend, device, dtype):
    kw64 = s4d_scan_inputs(1, 4, 300, 8, torch.float64, "cpu", seed=5)
    names = ["u", "delta", "B", "C", "z"]
    for name, (ours, ref, scale) in zip(names, _low_precision_grad_errors(K.selective_scan, backend, kw64, names,
                                                                          dtype, device)):
        assert ours <= 2 * ref + 1e-3 * scale, (name, ours, ref, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend,device", SCAN_2D_BACKENDS)
def test_2d_low_precision_backward(backend, device, dtype):
    kw64 = s4d_2d_inputs(1, 2, 8, 9, 8, torch.float64, "cpu", seed=6)
    names = ["x", "dt", "B", "C"]
    for name, (ours, ref, scale) in zip(names, _low_precision_grad_errors(K.selective_scan_2d, backend, kw64, names,
                                                                          dtype, device)):
        assert ours <= 2 * ref + 1e-3 * scale, (name, ours, ref, scale)


@pytest.mark.parametrize("backend,device", SCAN_2D_BACKENDS + [REF_BACKEND])
def test_2d_gradcheck_float64_across_chunks(backend, device):
    # 23 x 25 = 575 steps per direction: every direction crosses the 512-step checkpoint.
    kw = s4d_2d_inputs(1, 1, 23, 25, 2, torch.float64, device, seed=7)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    leaves = [kw[k].requires_grad_() for k in names]

    def fn(*tensors):
        with K.use_backend(backend):
            return K.selective_scan_2d(**{**kw, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend,device", SCAN_2D_BACKENDS)
@pytest.mark.parametrize("hw", [(21, 24), (16, 32), (19, 27)], ids=["L504", "L512", "L513"])
def test_2d_lengths_around_the_chunk(backend, device, hw):
    kw = s4d_2d_inputs(1, 2, *hw, 4, torch.float32, device, seed=8)
    names = ["x", "dt", "B", "C"]
    got, got_g = _grads(K.selective_scan_2d, backend, kw, names)
    want, want_g = _grads(K.selective_scan_2d, "reference", _as64(kw), names)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5)
    for name, g, w in zip(names, got_g, want_g):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-3, atol=1e-4 * w.abs().max().item(),
                                   msg=lambda m, name=name: f"d{name}: {m}")
