"""Launch-level bugs that only a GPU would show, caught here where they can be.

Each test names the bug it guards against: Python floats typed fp32 by Triton on a GPU, launches
outside the tensors' device, int32 offset overflow, grid sizes past a hardware limit, zero-block
launches and direct ``torch.ops`` calls that skip the Python wrapper's checks. The logic is tested
on the CPU (Triton interpreter, pure functions, direct op calls); what needs a GPU skips without one.
"""

import ast
import contextlib
import inspect
import textwrap
from types import SimpleNamespace

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


# --- patch_cross_attention / kmeans (Triton) ----------------------------------------------------

TRITON_PCA = [d for b, d in kernel_backends("patch_cross_attention") if b == "triton"]
triton_pca = pytest.mark.skipif(not TRITON_PCA, reason="triton cannot run here")
TRITON_KMEANS = [d for b, d in kernel_backends("kmeans") if b == "triton"]
triton_kmeans = pytest.mark.skipif(not TRITON_KMEANS, reason="triton cannot run here")


def _pca_triton():
    from lesionkit.kernels.patch_cross_attention import _triton

    return _triton()


def _kmeans_triton():
    from lesionkit.kernels.kmeans import _triton

    return _triton()


@triton_pca
@pytest.mark.parametrize("scale", [None, 0.7])
def test_patch_attention_triton_float64_keeps_a_float64_scale(floats_typed_as_on_gpu, scale):
    # 1/sqrt(3) and 0.7 are not fp32 numbers: an fp32 scale errs by ~2e-8 relative, far past
    # float64's tolerance.
    from lesionkit.kernels.reference.patch_cross_attention import patch_cross_attention_with_lse_reference

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 8, 8, dtype=torch.float64, generator=g).to(TRITON_PCA[0]).requires_grad_()
               for _ in range(3))
    with K.use_backend("triton"):
        got = K.patch_cross_attention(q, k, v, 4, scale)
    got_grads = torch.autograd.grad((got * got).sum(), (q, k, v))
    want = patch_cross_attention_with_lse_reference(q, k, v, 4, 0.7 if scale else 3 ** -0.5)[0]
    want_grads = torch.autograd.grad((want * want).sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for g_, w_ in zip(got_grads, want_grads):
        torch.testing.assert_close(g_, w_, rtol=1e-11, atol=1e-13)


@triton_pca
def test_patch_attention_triton_shared_memory_model():
    from lesionkit.kernels.triton.patch_cross_attention import shared_bytes

    # 64 x 64 tiles, 16 channels, fp32, 2 stages: the dk/dv kernel is the largest,
    # n*(dk+dv) + 2*m*(dk+2dv) + 2*m*n = 2048 + 6144 + 8192 values.
    assert shared_bytes(64, 64, 16, 16, 4, 2) == 4 * (2048 + 6144 + 8192)
    # The former whole-window design at P = 16 (one 256 x 256 tile): past an H200's 227 KB.
    assert shared_bytes(256, 256, 16, 16, 4, 1) > 227 * 1024


@triton_pca
@pytest.mark.parametrize("patch", [4, 8, 16, 32])
@pytest.mark.parametrize("budget_kb", [227, 99])
@pytest.mark.parametrize("elem", [4, 8])
@pytest.mark.parametrize("dk,dv", [(16, 16), (64, 64), (3, 100)])
def test_patch_attention_triton_blocks_fit_the_shared_memory_budget(patch, budget_kb, elem, dk, dv):
    from lesionkit.kernels.triton.patch_cross_attention import block_sizes, shared_bytes

    budget = budget_kb * 1024
    cfg = block_sizes(patch, dk, dv, elem, budget)
    used = shared_bytes(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_DK"], cfg["BLOCK_DV"], elem, cfg["num_stages"])
    assert used <= budget, cfg
    tokens = patch * patch
    for name in ("BLOCK_M", "BLOCK_N"):
        block = cfg[name]
        assert block >= 16 and block & (block - 1) == 0 and block <= max(16, tokens), cfg
    assert cfg["BLOCK_DK"] >= max(dk, 16) and cfg["BLOCK_DV"] >= max(dv, 16)
    if patch >= 16:
        assert cfg["BLOCK_N"] < tokens  # the window is tiled, never one (T x T) tile
    if elem == 8:
        assert cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 32 * 32  # fp64 accumulators stay in registers


@triton_pca
def test_patch_attention_triton_too_many_channels_is_a_clear_error():
    from lesionkit.kernels.triton.patch_cross_attention import block_sizes

    with pytest.raises(ValueError, match="dk=2048, dv=2048 need .* bytes of shared memory"):
        block_sizes(8, 2048, 2048, 8, 99 * 1024)


@triton_pca
def test_patch_attention_triton_tiles_a_p16_window(monkeypatch):
    # A budget that forces 16 x 16 tiles: T = 256 then takes 16 query and 16 key blocks, and the
    # online softmax must still match the reference (forward and gradients).
    impl = _pca_triton()
    monkeypatch.setattr(impl, "shared_memory_budget", lambda device: 24 * 1024)
    assert impl.block_sizes(16, 5, 7, 8, 24 * 1024)["BLOCK_N"] == 16
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 1, 5, 16, 32, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(1, 1, 7, 16, 32, dtype=torch.float64, generator=g).requires_grad_()
    leaves = [t.to(TRITON_PCA[0]).detach().requires_grad_() for t in (q, k, v)]
    outs = []
    for backend in ("triton", "reference"):
        with K.use_backend(backend):
            out = K.patch_cross_attention(*leaves, 16, 0.6)
        outs.append((out, torch.autograd.grad((out * out).sum(), leaves)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-14)
    for got, want in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def _record_launch_guards(monkeypatch, module) -> list[bool]:
    """Replace `module`'s device guard and kernel launcher so that every launch records whether
    it ran inside the guard."""
    inside = []
    launches = []

    @contextlib.contextmanager
    def guard(t):
        inside.append(t.device)
        try:
            yield
        finally:
            inside.pop()

    real = module.wrap_triton

    class Launcher:
        def __init__(self, kernel):
            self.launcher = real(kernel)

        def __getitem__(self, grid):
            run = self.launcher[grid]

            def launch(*args, **kwargs):
                launches.append(bool(inside))
                return run(*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "on_device", guard)
    monkeypatch.setattr(module, "wrap_triton", Launcher)
    return launches


@triton_pca
def test_patch_attention_triton_launches_under_the_tensors_device(monkeypatch):
    launches = _record_launch_guards(monkeypatch, _pca_triton())
    q, k, v = (torch.randn(1, 1, 2, 4, 4).to(TRITON_PCA[0]).requires_grad_() for _ in range(3))
    with K.use_backend("triton"):
        out = K.patch_cross_attention(q, k, v, 2)
    out.sum().backward()
    assert launches == [True, True, True]  # forward, dk/dv, dq


@triton_kmeans
def test_kmeans_triton_launches_under_the_tensors_device(monkeypatch):
    launches = _record_launch_guards(monkeypatch, _kmeans_triton())
    x = torch.randn(2, 20, 3).to(TRITON_KMEANS[0])
    with K.use_backend("triton"):
        K.kmeans(x, k=2, iters=3, tol=-1.0, seed=0)
    assert launches == [True] * 4  # three Lloyd steps, one assignment


def test_triton_device_guard_enters_the_tensors_device():
    from lesionkit.kernels.triton.launch import on_device

    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)
    # A stand-in for a cuda:1 tensor (constructing the guard needs no GPU; entering it would).
    guard = on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@triton_kmeans
def test_kmeans_assign_grid_puts_point_blocks_on_axis_0():
    from lesionkit.kernels.triton.kmeans import assign_grid

    # 1,048,561 points: 65,536 blocks of 16, one more than grid axis 1 takes.
    assert assign_grid(2, 1_048_561) == ((131_072,), 65_536)
    assert assign_grid(3, 17) == ((6,), 2)
    assert assign_grid(3, 0) == ((3,), 1)
    with pytest.raises(ValueError, match="more than a CUDA grid holds"):
        assign_grid(2**12, 2**24)


@triton_kmeans
@pytest.mark.parametrize("n", [15, 16, 33])
def test_kmeans_triton_assignment_over_several_problems_and_blocks(n):
    # Problem b's point blocks follow problem b - 1's on axis 0: labels and distances must land
    # in the right problem, the last (partial) block included.
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 2, dtype=torch.float64, generator=g).to(TRITON_KMEANS[0])
    with K.use_backend("triton"):
        got = K.kmeans(x, k=3, iters=2, tol=-1.0, seed=0)
    with K.use_backend("reference"):
        want = K.kmeans(x, k=3, iters=2, tol=-1.0, seed=0)
    assert torch.equal(got.labels, want.labels)
    torch.testing.assert_close(got.distances, want.distances, rtol=1e-12, atol=1e-12)


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


@triton_kmeans
def test_kmeans_lloyd_step_orders_every_read_before_its_overwrite():
    # A race, not a value: the interpreter runs a program as one thread, so the check is on the
    # kernel's source. In every loop, a store to a buffer that an earlier statement of the loop
    # read must follow a tl.debug_barrier() placed after that read; otherwise a lagging warp
    # could read what another warp already overwrote (docs/kmeans.md).
    source = textwrap.dedent(inspect.getsource(_kmeans_triton()._lloyd_step_kernel.fn))
    checked = 0
    for loop in (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.For)):
        alias: dict[str, set[str]] = {}
        read_at: dict[str, int] = {}
        barrier_at = -1
        for i, stmt in enumerate(loop.body):
            if isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    for name in _names(target):
                        alias[name] = set().union(*(alias.get(n, {n}) for n in _names(stmt.value)))
            calls = [c for c in ast.walk(stmt) if isinstance(c, ast.Call) and isinstance(c.func, (ast.Attribute, ast.Name))]
            for call in calls:
                fname = call.func.attr if isinstance(call.func, ast.Attribute) else call.func.id
                if fname == "debug_barrier":
                    barrier_at = i
                elif fname == "store":
                    for buf in set().union(*(alias.get(n, {n}) for n in _names(call.args[0]))):
                        if buf.endswith("_base") and buf in read_at and read_at[buf] < i:
                            assert barrier_at > read_at[buf], f"store to {buf} (line {stmt.lineno}) races its read"
                            checked += 1
            for call in calls:
                fname = call.func.attr if isinstance(call.func, ast.Attribute) else call.func.id
                if fname in ("load", "_load_centroids"):
                    for buf in set().union(*(alias.get(n, {n}) for n in _names(call.args[0]))):
                        read_at.setdefault(buf, i)
    assert checked >= 2  # the sums and the centroids of the update loop


# --- determinism (docs/ops.md) ------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic(warn_only=False):
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


def _scan_grads(device):
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, 8, 300, generator=g), torch.rand(2, 8, 300, generator=g)
    A, B, C = -torch.rand(8, 4, generator=g), torch.randn(2, 2, 4, 300, generator=g), torch.randn(2, 2, 4, 300, generator=g)
    leaves = [t.to(device).requires_grad_() for t in (u, delta, A, B, C)]
    out = K.selective_scan(*leaves, delta_softplus=True)
    return torch.autograd.grad(out.square().sum(), leaves)


@pytest.mark.skipif(not _library.has_kernel("selective_scan_backward", "CPU"), reason="no CPU kernel")
def test_scan_cpu_backward_is_reproducible_and_allowed_in_deterministic_mode():
    with _deterministic(), K.use_backend("cpu"):
        first, second = _scan_grads("cpu"), _scan_grads("cpu")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@cuda
@pytest.mark.skipif(not _library.has_kernel("selective_scan_backward", "CUDA"), reason="no CUDA kernel")
def test_scan_cuda_backward_alerts_in_deterministic_mode():
    # dB, dC and dA are summed with atomics: PyTorch's rule for such ops is an error under
    # use_deterministic_algorithms(True) and a warning with warn_only=True.
    with K.use_backend("cuda"):
        with _deterministic(), pytest.raises(RuntimeError, match="selective_scan_backward.*deterministic"):
            _scan_grads("cuda")
        with _deterministic(warn_only=True), pytest.warns(UserWarning, match="selective_scan_backward"):
            _scan_grads("cuda")
        out = K.selective_scan_2d(*(t.cuda().requires_grad_() for t in (
            torch.randn(1, 2, 3, 4), torch.rand(1, 4, 2, 3, 4), -torch.rand(4, 2, 5), torch.randn(1, 4, 5, 3, 4),
            torch.randn(1, 4, 5, 3, 4))), torch.rand(4, 2).cuda(), torch.rand(4, 2).cuda())
        with _deterministic(), pytest.raises(RuntimeError, match="selective_scan_2d_backward.*deterministic"):
            out.sum().backward()


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("patch", [16, 32])
def test_patch_attention_large_windows_launch_on_the_gpu(backend, patch):
    # P = 16 is GRCSF's last stage; whole-window Triton tiles needed ~320 KB of shared memory there.
    if backend == "cuda" and not _library.has_kernel("patch_cross_attention", "CUDA"):
        pytest.skip("no CUDA kernel")
    from lesionkit.kernels.reference.patch_cross_attention import patch_cross_attention_with_lse_reference

    g = torch.Generator().manual_seed(patch)
    q, k = (torch.randn(2, 1, 8, 2 * patch, 2 * patch, generator=g).cuda().requires_grad_() for _ in range(2))
    v = torch.randn(2, 1, 64, 2 * patch, 2 * patch, generator=g).cuda().requires_grad_()
    with K.use_backend(backend):
        got = K.patch_cross_attention(q, k, v, patch)
    got_grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    want = patch_cross_attention_with_lse_reference(q.double(), k.double(), v.double(), patch, 8 ** -0.5)[0]
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        scale = b.abs().max()
        torch.testing.assert_close(a.double() / scale, b.double() / scale, rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kmeans_assignment_past_grid_axis_1(backend):
    # 1,048,561 points: 65,536 blocks of 16, one more than grid axis 1 takes.
    if backend == "cuda" and not _library.has_kernel("kmeans", "CUDA"):
        pytest.skip("no CUDA kernel")
    n = 1_048_561
    x = torch.zeros(1, n, 1, device="cuda")
    x[0, -1, 0] = 10.0  # the last point alone in the far cluster
    init = torch.tensor([[[0.0], [10.0]]], device="cuda")
    with K.use_backend(backend):
        got = K.kmeans(x, k=2, iters=2, init=init)
    assert got.labels[0, -1].item() == 1 and got.labels[0, :-1].eq(0).all()
    assert got.distances[0, -1, 1].item() == 0.0
