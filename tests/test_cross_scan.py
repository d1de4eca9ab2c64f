"""cross_scan / cross_merge (VMamba's cross-scan and its adjoint, docs/ss2d.md) on every backend
against their reference: exact values, the adjoint identity, gradcheck, opcheck, bad inputs."""

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels import _library

from conftest import backend_params

CROSS_BACKENDS = backend_params("cross_scan")
REFERENCE = pytest.param("reference", torch.device("cpu"), id="reference")
needs_ops = pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")

SPATIAL = [(2, 3, 5, 7), (1, 2, 14, 14), (1, 1, 1, 9), (2, 4, 8, 3)]


@pytest.mark.parametrize("backend,device", CROSS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SPATIAL, ids=lambda s: "x".join(map(str, s)))
def test_cross_scan_and_merge_match_reference(backend, device, dtype, shape):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(*shape, generator=gen).to(device, dtype)
    y = torch.randn(shape[0], 4, shape[1], shape[2] * shape[3], generator=gen).to(device, dtype)
    with K.use_backend(backend):
        got_scan = K.cross_scan(x.transpose(2, 3).contiguous().transpose(2, 3))  # strided input
        got_merge = K.cross_merge(y, shape[2], shape[3])
    assert torch.equal(got_scan, K.cross_scan_reference(x))
    # The kernels sum the four directions in float32 and round once.
    want = K.cross_merge_reference(y.double(), shape[2], shape[3]).to(dtype)
    torch.testing.assert_close(got_merge, want, rtol=1e-6 if dtype != torch.bfloat16 else 1e-2,
                               atol=1e-6)


def test_cross_scan_directions_follow_vmamba_order():
    x = torch.arange(6.0).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    got = K.cross_scan_reference(x)[0, :, 0]
    want = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0],
                         [5, 2, 4, 1, 3, 0]], dtype=x.dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device", CROSS_BACKENDS + [REFERENCE])
def test_cross_merge_is_the_adjoint_of_cross_scan(backend, device):
    # <cross_scan(x), y> = <x, cross_merge(y)>, and each one's gradient is the other.
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(2, 4, 3, 30, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    interpreted = backend == "triton" and device.type == "cpu"  # slow: gradcheck's fast mode
    with K.use_backend(backend):
        sx, my = K.cross_scan(x), K.cross_merge(y, 5, 6)
        torch.testing.assert_close((sx * y).sum(), (x * my).sum())
        assert torch.autograd.gradcheck(K.cross_scan, (x,), fast_mode=interpreted)
        assert torch.autograd.gradcheck(lambda t: K.cross_merge(t, 5, 6), (y,),
                                        fast_mode=interpreted)


@needs_ops
def test_opcheck_cross_scan_and_merge():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.lesionkit.cross_scan.default, (x,))
    y = torch.randn(2, 4, 3, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.lesionkit.cross_merge.default, (y, 4, 5))


@pytest.mark.parametrize("backend,device", [p for p in CROSS_BACKENDS if p.values[0] == "triton"])
def test_opcheck_triton_cross_scan(backend, device):
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    with K.use_backend("triton"):
        K.cross_scan(x)  # registers the Triton ops' autograd on first use
    # The Triton interpreter dereferences fake tensors: fake and compile checks run on a GPU only.
    kwargs = {"test_utils": ("test_schema", "test_autograd_registration")} if device.type == "cpu" else {}
    torch.library.opcheck(torch.ops.lesionkit.cross_scan_triton.default, (x,), **kwargs)
    y = torch.randn(2, 4, 3, 20, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.lesionkit.cross_merge_triton.default, (y, 4, 5), **kwargs)


@pytest.mark.parametrize(
    "fn, args, match",
    [
        (K.cross_scan, (torch.zeros(2, 3, 4),), r"x should be a \(B, C, H, W\) tensor"),
        (K.cross_merge, (torch.zeros(2, 3, 3, 20), 4, 5), r"y should be a \(B, 4, C, H\*W\) tensor"),
        (K.cross_merge, (torch.zeros(2, 4, 3, 20), 4, 6), "H\\*W = 4\\*6 = 24, got 20"),
        (K.cross_merge, (torch.zeros(2, 4, 3, 20), 0, 5), "H should be a positive int, got 0"),
    ],
)
def test_cross_bad_inputs(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)
