"""Launch-level bugs that only a GPU would show, caught here where they can be.

Each test names the bug it guards against: Python floats typed fp32 by Triton on a GPU, launches
outside the tensors' device, int32 offset overflow, grid sizes past a hardware limit, zero-block
launches and direct ``torch.ops`` calls that skip the Python wrapper's checks. The logic is tested
on the CPU (Triton interpreter, pure functions, direct op calls); what needs a GPU skips without one.
"""

import numpy as np
import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels import _library
from lesionkit.kernels.reference.patchwise_softmax_loss import patchwise_softmax_loss_per_image_reference

from conftest import kernel_backends

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
TRITON_PATCHWISE = [d for b, d in kernel_backends("patchwise_softmax_loss") if b == "triton"]
triton_patchwise = pytest.mark.skipif(not TRITON_PATCHWISE, reason="triton cannot run here")


def _free_gpu_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


def _patchwise_triton():
    from lesionkit.kernels.patchwise_softmax_loss import _triton

    return _triton()  # the Triton module, with its autograd formula registered


@pytest.fixture
def floats_typed_as_on_gpu(monkeypatch):
    """Make the Triton interpreter pass a Python float as fp32, as compiled Triton does on a GPU
    (the interpreter alone keeps float64 and hides the precision loss)."""
    if not (TRITON_PATCHWISE and TRITON_PATCHWISE[0].type == "cpu"):
        pytest.skip("needs the Triton interpreter")
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def gpu_like(arg):
        if isinstance(arg, float) and not isinstance(arg, bool):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", gpu_like)


@triton_patchwise
def test_patchwise_triton_float64_keeps_float64_scalars(floats_typed_as_on_gpu):
    # C * P^2 = 27 and beta = 0.3 are not powers of two: fp32 1/27 or 1/0.3 is off by ~1e-8.
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 3, 6, 9, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.rand(2, 3, 6, 9, dtype=torch.float64, generator=g)
    with K.use_backend("triton"):
        got = K.patchwise_softmax_loss(pred, target, 3, 0.3, reduction="none")
    (got_grad,) = torch.autograd.grad(got.sum(), pred)
    want = patchwise_softmax_loss_per_image_reference(pred, target, 3, 0.3, None, False)
    (want_grad,) = torch.autograd.grad(want.sum(), pred)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-16)


@triton_patchwise
@pytest.mark.parametrize("n", [1023, 1024, 1025, 2049])
@pytest.mark.parametrize("with_mask", [False, True])
def test_patchwise_triton_per_image_kernels_past_one_block(n, with_mask):
    # The softmax and coefficient kernels loop over an image's patches in blocks of 1024; they
    # are launched directly (one program per image) because a full op call at this size runs one
    # interpreted program per patch, minutes on the CPU.
    import triton.language as tl

    impl = _patchwise_triton()
    device = TRITON_PATCHWISE[0]
    g = torch.Generator().manual_seed(n)
    beta, per_patch = 0.05, 27
    L = torch.rand(2, n, dtype=torch.float64, generator=g).to(device)
    mask = torch.ones(2, n, dtype=torch.bool)
    if with_mask:
        mask = torch.rand(2, n, generator=g) > 0.3
        mask[:, -1] = True  # a counted patch in the last block
    mask = mask.to(device)
    weights, loss = torch.empty_like(L), L.new_empty(2)
    inv_beta = impl._inv_beta(beta, L)
    flags = dict(HAS_MASK=with_mask, BLOCK=impl._PER_IMAGE_BLOCK, ACC=tl.float64)
    impl._softmax_kernel[(2,)](L, impl._mask_arg(mask if with_mask else None, L), weights, loss, n, inv_beta, **flags)
    want_w = torch.softmax((L / beta).masked_fill(~mask, -torch.inf), dim=1)
    count = mask.sum(1)
    torch.testing.assert_close(weights, want_w, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(loss, (want_w * L).sum(1) / count, rtol=1e-12, atol=0)
    grad_loss = torch.tensor([0.7, -1.3], dtype=torch.float64, device=device)
    coef = torch.empty_like(L)
    impl._coefficient_kernel[(2,)](grad_loss, L, weights, impl._mask_arg(mask if with_mask else None, L), coef, n,
                                   inv_beta, per_patch, DETACH=False, **flags)
    lbar = (want_w * L).sum(1, keepdim=True)
    want_coef = (grad_loss / count * 2 / per_patch)[:, None] * want_w * (1 + (L - lbar) / beta)
    torch.testing.assert_close(coef, want_coef.masked_fill(~mask, 0), rtol=1e-11, atol=1e-300)


@triton_patchwise
def test_patchwise_triton_direct_calls_check_their_inputs():
    impl = _patchwise_triton()
    device = TRITON_PATCHWISE[0]
    x = torch.zeros(1, 1, 16, 16, device=device)
    with pytest.raises(ValueError, match="multiples of patch_size=5"):
        impl.patchwise_softmax_loss_triton(x, x, 5, 1.0, None)
    with pytest.raises(ValueError, match="beta should be > 0"):
        impl.patchwise_softmax_loss_triton(x, x, 8, 0.0, None)
    with pytest.raises(ValueError, match="same dtype"):
        impl.patchwise_softmax_loss_triton(x, x.double(), 8, 1.0, None)
    _, patch_loss, weights = impl.patchwise_softmax_loss_triton(x, x, 8, 1.0, None)
    with pytest.raises(ValueError, match="multiples of patch_size=3"):
        impl.patchwise_softmax_loss_backward_triton(torch.ones(1, device=device), x, x, patch_loss, weights,
                                                    None, 3, 1.0, False)
    with pytest.raises(ValueError, match=r"weights should have shape \(1, 4\), got \(1, 3\)"):
        impl.patchwise_softmax_loss_backward_triton(torch.ones(1, device=device), x, x, patch_loss,
                                                    weights[:, :3], None, 8, 1.0, False)
    with pytest.raises(ValueError, match="patch_loss should be a torch.float32 tensor"):
        impl.patchwise_softmax_loss_backward_triton(torch.ones(1, device=device), x, x, patch_loss.double(),
                                                    weights, None, 8, 1.0, False)
    with pytest.raises(ValueError, match="grad_loss should be on pred's device"):
        impl.patchwise_softmax_loss_backward_triton(torch.ones(1, device="meta"), x, x, patch_loss, weights,
                                                    None, 8, 1.0, False)


@triton_patchwise
def test_patchwise_triton_backward_with_no_channels():
    # C = 0: nothing to write, and no zero-sized grid may be launched.
    impl = _patchwise_triton()
    device = TRITON_PATCHWISE[0]
    x = torch.zeros(2, 0, 8, 8, device=device)
    acc = torch.zeros(2, 1, device=device)
    grad = impl.patchwise_softmax_loss_backward_triton(torch.ones(2, device=device), x, x, acc, acc, None, 8,
                                                       1.0, False)
    assert grad.shape == x.shape


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
def test_patchwise_compiled_backward_with_no_channels():
    x = torch.zeros(2, 0, 8, 8)
    acc = torch.zeros(2, 1)
    grad = torch.ops.lesionkit.patchwise_softmax_loss_backward(torch.ones(2), x, x, acc, acc, None, 8, 1.0, False)
    assert grad.shape == x.shape


@cuda
@pytest.mark.skipif(not _library.has_kernel("patchwise_softmax_loss_backward", "CUDA"), reason="no CUDA kernel")
def test_patchwise_cuda_backward_checks_devices_and_empty_channels():
    op = torch.ops.lesionkit.patchwise_softmax_loss_backward
    x = torch.rand(1, 1, 16, 16, device="cuda")
    _, patch_loss, weights = torch.ops.lesionkit.patchwise_softmax_loss(x, x, 8, 1.0, None)
    for i, name in ((0, "grad_loss"), (3, "patch_loss"), (4, "weights")):
        args = [torch.ones(1, device="cuda"), x, x, patch_loss, weights, None, 8, 1.0, False]
        args[i] = args[i].cpu()
        with pytest.raises(RuntimeError, match=f"{name}.*should be on pred's device|grad_loss, patch_loss and weights"):
            op(*args)
    empty = torch.zeros(2, 0, 8, 8, device="cuda")
    acc = torch.zeros(2, 1, device="cuda")
    assert op(torch.ones(2, device="cuda"), empty, empty, acc, acc, None, 8, 1.0, False).shape == empty.shape
    torch.cuda.synchronize()


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_patchwise_on_a_device_other_than_the_current_one(backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    pred = torch.rand(2, 3, 16, 16, device="cuda:1", requires_grad=True)
    target = torch.rand(2, 3, 16, 16, device="cuda:1")
    with torch.cuda.device(0), K.use_backend(backend):
        got = K.patchwise_softmax_loss(pred, target, 8, 0.5)
        got.backward()
    want = patchwise_softmax_loss_per_image_reference(pred.detach().cpu(), target.cpu(), 8, 0.5, None, False).mean()
    torch.testing.assert_close(got.cpu(), want)


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_patchwise_offsets_past_int32(backend):
    # One image of C * H * W > 2**31 elements: channel offsets c * H * W overflow int32.
    c, h, w = 3, 32768, 22000  # 2.16e9 elements per tensor, 4.3 GB each in bf16
    if _free_gpu_bytes() < 4 * c * h * w * 2:
        pytest.skip("not enough GPU memory")
    if backend == "cuda" and not _library.has_kernel("patchwise_softmax_loss", "CUDA"):
        pytest.skip("no CUDA kernel")
    pred = torch.zeros(1, c, h, w, device="cuda", dtype=torch.bfloat16)
    target = torch.zeros_like(pred)
    pred[0, -1, -8:, -8:] = 1  # only the last patch of the last channel differs
    with K.use_backend(backend):
        loss = K.patchwise_softmax_loss(pred, target, 8, 1e-3, reduction="none")
    n = (h // 8) * (w // 8)
    # The one patch with error 1/3 takes all the softmax weight: loss = (1/3) / n.
    torch.testing.assert_close(loss.float().cpu(), torch.tensor([1 / 3 / n]), rtol=2e-2, atol=0)


# --- cross_scan / cross_merge (Triton) ----------------------------------------------------------

TRITON_CROSS = [d for b, d in kernel_backends("cross_scan") if b == "triton"]
triton_cross = pytest.mark.skipif(not TRITON_CROSS, reason="triton cannot run here")


@triton_cross
def test_cross_scan_launch_grid_uses_one_axis_within_its_limit():
    from lesionkit.kernels.triton.cross_scan import launch_grid

    # VM-UNet stage 4 training: 32 x 3072 planes, more than grid axis 1 (65,535) could take.
    grid, block, per_plane = launch_grid(32 * 3072, 49)
    assert grid == (32 * 3072,) and block == 64 and per_plane == 1
    # One 8192 x 8192 plane: 65,536 pixel blocks, one more than axis 1 allows.
    grid, block, per_plane = launch_grid(1, 8192 * 8192)
    assert grid == (65536,) and block == 1024 and per_plane == 65536
    grid, _, per_plane = launch_grid(3, 1025)
    assert grid == (6,) and per_plane == 2
    with pytest.raises(ValueError, match="more than a CUDA grid holds"):
        launch_grid(2**21, 2**21)


@triton_cross
@pytest.mark.parametrize("shape", [(1, 2, 32, 32), (2, 3, 41, 25), (1, 1, 1, 2049)], ids=lambda s: "x".join(map(str, s)))
def test_cross_scan_triton_past_one_block(shape):
    # H * W = 1024, 1025 and 2049: the last pixel block is full, has one pixel, or one of three.
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(TRITON_CROSS[0])
    with K.use_backend("triton"):
        y = K.cross_scan(x)
        merged = K.cross_merge(y, *shape[-2:])
    with K.use_backend("reference"):
        torch.testing.assert_close(y, K.cross_scan(x), rtol=0, atol=0)
        torch.testing.assert_close(merged, K.cross_merge(y, *shape[-2:]), rtol=1e-15, atol=0)


@triton_cross
def test_cross_triton_direct_calls_check_their_inputs():
    from lesionkit.kernels.cross_scan import _triton_ops

    impl = _triton_ops()
    y = torch.zeros(2, 4, 3, 20, device=TRITON_CROSS[0])
    with pytest.raises(ValueError, match=r"H\*W = 4\*6 = 24, got 20"):
        impl.cross_merge_triton(y, 4, 6)  # would read past the end of y
    with pytest.raises(ValueError, match="H should be a positive int"):
        impl.cross_merge_triton(y, 0, 20)
    with pytest.raises(ValueError, match=r"x should be a \(B, C, H, W\) tensor"):
        impl.cross_scan_triton(torch.zeros(2, 3, 4, device=TRITON_CROSS[0]))


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cross_scan_more_pixel_blocks_than_grid_axis_1_holds(backend):
    # 8200 x 8200 pixels = 65,665 blocks of 1024: past the 65,535 of a grid's axis 1.
    x = torch.randn(1, 2, 8200, 8200, device="cuda", dtype=torch.float16)
    with K.use_backend(backend):
        y = K.cross_scan(x)
        merged = K.cross_merge(y, 8200, 8200)
    assert torch.equal(y[0, 1, 1], x[0, 1].t().flatten())
    assert torch.equal(y[0, 3, 0], x[0, 0].t().flatten().flip(0))
    torch.testing.assert_close(merged.float(), 4 * x.float(), rtol=1e-3, atol=1e-3)


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cross_scan_offsets_past_int32(backend):
    # 3 * C * L > 2**31: the offset of the last direction overflows int32.
    b, c, h, w = 1, 70_000, 104, 104  # 7.6e8 inputs, 3.0e9 outputs: 1.5 + 6.1 GB in fp16
    if _free_gpu_bytes() < 4 * 5 * b * c * h * w * 2:
        pytest.skip("not enough GPU memory")
    x = torch.randn(b, c, h, w, device="cuda", dtype=torch.float16)
    with K.use_backend(backend):
        y = K.cross_scan(x)
    assert torch.equal(y[0, 3, -1], x[0, -1].t().flatten().flip(0))  # the last plane of the last direction
    assert torch.equal(y[0, 2, c // 2], x[0, c // 2].flatten().flip(0))
    with K.use_backend(backend):
        merged = K.cross_merge(y, h, w)
    torch.testing.assert_close(merged[:, -3:].float(), 4 * x[:, -3:].float(), rtol=1e-3, atol=1e-3)


@cuda
@pytest.mark.skipif(not _library.has_kernel("selective_scan_backward", "CUDA"), reason="no CUDA kernel")
def test_scan_cuda_backwards_check_the_device_of_every_tensor():
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 4, 10, generator=g).cuda(), torch.rand(1, 4, 10, generator=g).cuda()
    A, B, C = -torch.rand(4, 3).cuda(), torch.randn(1, 3, 10).cuda(), torch.randn(1, 3, 10).cuda()
    out, last, ckpt = torch.ops.lesionkit.selective_scan(u, delta, A, B, C, None, None, None, False)
    op = torch.ops.lesionkit.selective_scan_backward
    args = [torch.ones_like(out), torch.ones_like(last), u, delta, A, B, C, None, None, None, False, ckpt]
    for i, name in ((0, "grad_out"), (1, "grad_last_state"), (11, "checkpoints")):
        bad = list(args)
        bad[i] = bad[i].cpu()
        with pytest.raises(RuntimeError, match=f"{name} should be on u's device"):
            op(*bad)
    x = torch.randn(1, 2, 3, 4).cuda()
    kw = [x, torch.rand(1, 4, 2, 3, 4).cuda(), -torch.rand(4, 2, 5).cuda(), torch.randn(1, 4, 5, 3, 4).cuda(),
          torch.randn(1, 4, 5, 3, 4).cuda(), torch.rand(4, 2).cuda(), torch.rand(4, 2).cuda(), True]
    out, ckpt = torch.ops.lesionkit.selective_scan_2d(*kw)
    op2 = torch.ops.lesionkit.selective_scan_2d_backward
    with pytest.raises(RuntimeError, match="grad_out should be on x's device"):
        op2(torch.ones_like(out).cpu(), *kw, ckpt)
    with pytest.raises(RuntimeError, match="checkpoints should be on x's device"):
        op2(torch.ones_like(out), *kw, ckpt.cpu())
