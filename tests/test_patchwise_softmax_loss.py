"""patchwise_softmax_loss on every backend against its reference (STYLE rule 6)."""

import math

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels import _library
from lesionkit.kernels.reference.patchwise_softmax_loss import (
    patchwise_softmax_loss_per_image_reference,
)

from conftest import backend_params

OP = "patchwise_softmax_loss"
BACKENDS = backend_params(OP)

# (B, C, H, W, P): non-square, C = 1 and 3, a single patch, patch sizes that are not powers of two.
SHAPES = [
    (2, 3, 32, 48, 16),
    (3, 1, 20, 28, 4),
    (1, 1, 16, 16, 16),
    (2, 3, 30, 45, 15),
    (4, 2, 12, 6, 3),
]
# (rtol, atol) of the forward per dtype (docs/ops.md, Tolerances; bf16/fp16 carry their input rounding).
FORWARD_TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12),
               torch.bfloat16: (2e-2, 1e-3), torch.float16: (2e-2, 1e-3)}


def make_inputs(shape, dtype, device, seed=0, noncontiguous=False, with_mask=False):
    b, c, h, w, p = shape
    gen = torch.Generator().manual_seed(seed)
    if noncontiguous:  # same logical shape, transposed storage
        pred = torch.rand(b, c, w, h, generator=gen).transpose(-1, -2)
        target = (torch.rand(b, c, w, h, generator=gen) > 0.5).float().transpose(-1, -2)
    else:
        pred = torch.rand(b, c, h, w, generator=gen)
        target = (torch.rand(b, c, h, w, generator=gen) > 0.5).float()
    mask = None
    if with_mask:
        n = (h // p) * (w // p)
        mask = torch.rand(b, n, generator=gen) > 0.5
        mask[:, 0] = True  # at least one counted patch per image
        mask = mask.to(device)
    return pred.to(device, dtype), target.to(device, dtype), mask


def run(backend, *args, **kwargs):
    with K.use_backend(backend):
        return K.patchwise_softmax_loss(*args, **kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["plain", "noncontiguous", "mask"])
def test_forward_matches_reference(backend, device, dtype, shape, variant):
    pred, target, mask = make_inputs(shape, dtype, device, noncontiguous=variant == "noncontiguous",
                                     with_mask=variant == "mask")
    beta = 0.05
    got = run(backend, pred, target, shape[-1], beta, mask=mask, reduction="none")
    want = run("reference", pred, target, shape[-1], beta, mask=mask, reduction="none")
    assert got.dtype == dtype and got.shape == (shape[0],)
    rtol, atol = FORWARD_TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("detach_weights", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradients_match_reference(backend, device, shape, detach_weights, with_mask, reduction):
    pred, target, mask = make_inputs(shape, torch.float32, device, seed=1, with_mask=with_mask)
    grads = []
    for name in (backend, "reference"):
        p = pred.clone().requires_grad_()
        t = target.clone().requires_grad_()
        loss = run(name, p, t, shape[-1], 0.02, mask=mask, detach_weights=detach_weights,
                   reduction=reduction)
        grads.append(torch.autograd.grad(loss, (p, t)))
    for got, want in zip(*grads):
        scale = want.abs().max().clamp_min(1e-30)  # docs/ops.md: gradients compare scaled by max |g|
        torch.testing.assert_close(got / scale, want / scale, rtol=1e-4, atol=1e-5)


def test_weight_path_changes_the_gradient():
    # Guards the test above: detaching the weights must matter, or it proves nothing.
    pred, target, _ = make_inputs(SHAPES[0], torch.float64, "cpu")
    grads = []
    for detach in (False, True):
        p = pred.clone().requires_grad_()
        loss = run("reference", p, target, 16, 0.02, detach_weights=detach)
        grads.append(torch.autograd.grad(loss, p)[0])
    assert (grads[0] - grads[1]).abs().max() > 1e-3 * grads[0].abs().max()


@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("reference", torch.device("cpu"), id="reference")])
@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck_float64(backend, device, with_mask):
    # Only the full gradient is a derivative of the loss; detached weights are checked against
    # the reference in test_gradients_match_reference.
    interpreted = backend == "triton" and device.type == "cpu"
    shape = (1, 2, 4, 8, 4) if interpreted else (2, 2, 8, 12, 4)
    pred, target, mask = make_inputs(shape, torch.float64, device, seed=2, with_mask=with_mask)
    pred.requires_grad_()
    target.requires_grad_()

    def fn(p, t):
        return run(backend, p, t, 4, 0.1, mask=mask, reduction="none")

    # The Triton interpreter is slow: there, gradcheck's fast mode (random projections).
    assert torch.autograd.gradcheck(fn, (pred, target), eps=1e-6, atol=1e-7, fast_mode=interpreted)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_low_precision_error_within_reference_error(backend, device, dtype):
    # flash-attention's rule: the kernel's error against a float64 oracle may be at most a
    # small multiple of the same-dtype reference's own error.
    pred, target, _ = make_inputs((4, 3, 64, 64, 16), dtype, device, seed=3)
    exact = run("reference", pred.double(), target.double(), 16, 0.01, reduction="none")
    p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
    got = run(backend, p, t, 16, 0.01, reduction="none")
    (got_grad,) = torch.autograd.grad(got.sum(), p)
    ref = run("reference", pred.clone(), target, 16, 0.01, reduction="none")
    pd = pred.double().requires_grad_()
    exact_grad = torch.autograd.grad(run("reference", pd, target.double(), 16, 0.01).sum() * 4, pd)[0]
    ref_err = (ref.double() - exact).abs().max().item()
    got_err = (got.double() - exact).abs().max().item()
    eps = torch.finfo(dtype).eps
    assert got_err <= 2 * ref_err + 4 * eps * exact.abs().max().item()
    grad_err = (got_grad.double() - exact_grad).abs().max() / exact_grad.abs().max()
    assert grad_err <= 8 * eps


@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("reference", torch.device("cpu"), id="reference")])
def test_extreme_temperatures_are_finite_and_limit_correctly(backend, device):
    pred, target, _ = make_inputs((2, 1, 32, 32, 8), torch.float32, device, seed=4)
    n = 16
    err = (pred.double() - target.double()).square()
    patch = err.view(2, 1, 4, 8, 4, 8).mean(dim=(1, 3, 5)).reshape(2, -1)
    # beta -> inf: uniform weights, loss = mean patch loss / N.
    hot = run(backend, pred, target, 8, 1e6, reduction="none")
    torch.testing.assert_close(hot.double(), patch.mean(1) / n, rtol=1e-4, atol=0)
    # beta -> 0: all weight on the worst patch.
    cold = run(backend, pred, target, 8, 1e-6, reduction="none")
    torch.testing.assert_close(cold.double(), patch.amax(1) / n, rtol=1e-4, atol=0)
    # Huge errors with a small beta must not overflow the softmax.
    big = run(backend, pred * 1e4, target, 8, 1e-6, reduction="none")
    assert torch.isfinite(big).all()
    p = pred.clone().requires_grad_()
    (g,) = torch.autograd.grad(run(backend, p * 1e3, target, 8, 1e-6), p)
    assert torch.isfinite(g).all()


def test_mask_restricts_softmax_and_sum_to_masked_patches():
    pred, target, _ = make_inputs((1, 1, 16, 16, 8), torch.float64, "cpu", seed=5)
    mask = torch.tensor([[True, False, False, True]])
    got = run("reference", pred, target, 8, 0.3, mask=mask, reduction="none")
    err = (pred - target).square().view(1, 1, 2, 8, 2, 8).mean(dim=(1, 3, 5)).reshape(-1)
    kept = err[[0, 3]]
    w = torch.softmax(kept / 0.3, 0)
    torch.testing.assert_close(got, ((w * kept).sum() / 2).reshape(1))
    # Changing an unmasked patch does not change the loss.
    pred2 = pred.clone()
    pred2[..., :8, 8:] += 5
    torch.testing.assert_close(run("reference", pred2, target, 8, 0.3, mask=mask, reduction="none"), got)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    pred = torch.zeros(0, 1, 16, 16, device=device)
    assert run(backend, pred, pred, 8, 1.0, reduction="none").shape == (0,)


def test_module_wrapper_and_mixed_dtypes():
    pred, target, _ = make_inputs((2, 1, 16, 16, 8), torch.float32, "cpu")
    from lesionkit.losses import PatchwiseSoftmaxLoss

    module = PatchwiseSoftmaxLoss(patch_size=8, beta=0.5, from_logits=False)
    assert "patch_size=8" in repr(module)
    want = run("reference", pred, target, 8, 0.5)
    torch.testing.assert_close(module(pred, target), want)
    torch.testing.assert_close(module(pred, target.double()).float(), want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target=torch.zeros(2, 1, 16, 8)), "same shape"),
        (dict(pred=torch.zeros(2, 16, 16), target=torch.zeros(2, 16, 16)), r"\(B, C, H, W\)"),
        (dict(patch_size=5), "patch_size=5.*H=16, W=16"),
        (dict(patch_size=0), "patch_size should be a positive int"),
        (dict(beta=0.0), "beta should be > 0, got 0.0"),
        (dict(beta=-1.0), "beta should be > 0"),
        (dict(beta=float("nan")), "beta should be > 0"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool)), r"mask should have shape \(B, N\) = \(2, 4\)"),
        (dict(mask=torch.ones(2, 4)), "mask should be a bool tensor"),
        (dict(mask=torch.tensor([[True] * 4, [False] * 4])), r"images \[1\] have none"),
        (dict(reduction="avg"), "reduction should be one of"),
        (dict(target=torch.zeros(2, 1, 16, 16, dtype=torch.int64)), "floating"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    args = dict(pred=torch.zeros(2, 1, 16, 16), target=torch.zeros(2, 1, 16, 16), patch_size=8,
                beta=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        K.patchwise_softmax_loss(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to hold a second device")
def test_devices_must_match():
    with pytest.raises(ValueError, match="same device"):
        K.patchwise_softmax_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8, device="cuda"), 8, 1.0)


def test_devices_must_match_on_cpu_machine():
    # A meta tensor stands in for "another device" where no GPU exists.
    with pytest.raises(ValueError, match="same device, got cpu and meta"):
        K.patchwise_softmax_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8, device="meta"), 8, 1.0)


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
def test_compiled_op_checks_its_inputs():
    # A direct torch.ops call (no Python wrapper) still gets a message naming the argument.
    op = torch.ops.lesionkit.patchwise_softmax_loss
    with pytest.raises(RuntimeError, match="divisible by patch_size=5"):
        op(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), 5, 1.0, None)
    with pytest.raises(RuntimeError, match="beta should be > 0"):
        op(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), 8, -2.0, None)
    with pytest.raises(RuntimeError, match="at least one true entry per image, image 0"):
        op(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), 8, 1.0,
           torch.zeros(1, 4, dtype=torch.bool))


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_compiled(with_mask):
    pred, target, mask = make_inputs((2, 3, 16, 24, 8), torch.float32, "cpu", with_mask=with_mask)
    pred.requires_grad_()
    torch.library.opcheck(torch.ops.lesionkit.patchwise_softmax_loss.default,
                          (pred, target, 8, 0.5, mask, False))
    loss, patch_loss, weights = torch.ops.lesionkit.patchwise_softmax_loss(pred, target, 8, 0.5, mask)
    torch.library.opcheck(torch.ops.lesionkit.patchwise_softmax_loss_backward.default,
                          (torch.ones(2), pred.detach(), target, patch_loss, weights, mask, 8, 0.5, False))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "triton"])
def test_opcheck_triton(backend, device):
    pred, target, mask = make_inputs((2, 1, 16, 16, 8), torch.float32, device, with_mask=True)
    pred.requires_grad_()
    K.patchwise_softmax_loss(pred, target, 8, 0.5)  # registers the Triton op on first use
    with K.use_backend("triton"):
        K.patchwise_softmax_loss(pred, target, 8, 0.5)
    # The Triton interpreter dereferences fake tensors, so the fake-tensor and compile checks
    # of opcheck run on a GPU only.
    kwargs = {"test_utils": ("test_schema", "test_autograd_registration")} if device.type == "cpu" else {}
    torch.library.opcheck(torch.ops.lesionkit.patchwise_softmax_loss_triton.default,
                          (pred, target, 8, 0.5, mask, False), **kwargs)


# The Triton interpreter cannot run inside a compiled graph; on a GPU Triton is compiled too.
COMPILABLE = [p for p in BACKENDS if p.values[1].type == "cuda" or p.values[0] != "triton"]


@pytest.mark.parametrize("backend,device", COMPILABLE + [pytest.param("reference", torch.device("cpu"), id="reference")])
def test_torch_compile_fullgraph(backend, device):
    pred, target, mask = make_inputs((2, 1, 32, 32, 8), torch.float32, device, with_mask=True)

    def step(p, t, m):
        return K.patchwise_softmax_loss(p * 1.5, t, 8, 0.25, mask=m)

    p = pred.clone().requires_grad_()
    with K.use_backend(backend):
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(p, target, mask)
    (got_grad,) = torch.autograd.grad(got, p)
    q = pred.clone().requires_grad_()
    want = run("reference", q * 1.5, target, 8, 0.25, mask=mask)
    (want_grad,) = torch.autograd.grad(want, q)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
def test_torch_compile_inductor_forward_backward():
    pred, target, _ = make_inputs((2, 1, 16, 16, 8), torch.float32, "cpu")

    def loss_and_grad(p, t):
        p = p.detach().requires_grad_()
        loss = K.patchwise_softmax_loss(p * 2.0, t, 8, 0.5)
        loss.backward()
        return loss.detach(), p.grad

    with K.use_backend("cpu"):
        got_loss, got_grad = torch.compile(loss_and_grad)(pred, target)
    with K.use_backend("reference"):
        want_loss, want_grad = loss_and_grad(pred, target)
    torch.testing.assert_close(got_loss, want_loss)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)


def test_reference_matches_a_direct_transcription_of_the_paper():
    # Eq. 5-8 written out per patch with Python loops: an oracle independent of the reference.
    pred, target, _ = make_inputs((2, 2, 8, 12, 4), torch.float64, "cpu", seed=7)
    beta = 0.2
    want = []
    for b in range(2):
        losses = []
        for r in range(2):
            for c in range(3):
                patch = (pred[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
                         - target[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]) ** 2
                losses.append(patch.mean().item())
        z = [math.exp(l / beta) for l in losses]
        want.append(sum(zi / sum(z) * l for zi, l in zip(z, losses)) / len(losses))
    got = patchwise_softmax_loss_per_image_reference(pred, target, 4, beta)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
