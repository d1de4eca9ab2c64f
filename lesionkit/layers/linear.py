"""float32 matrix products on the CPU through oneDNN where PyTorch's BLAS path is slow.

PyTorch runs a float32 ``nn.Linear`` / ``torch.bmm`` on the CPU through MKL's sgemm. MKL picks
its code path by CPU vendor: on AMD processors it takes the AVX2 path even where the core has
full-width AVX-512 (Zen 4, Zen 5), while oneDNN, which PyTorch ships beside it (and uses for
its bf16 matmuls and all convolutions), picks by instruction set. On a 2-core AMD EPYC Zen 5,
one thread, the float32 products of a ``vmunet`` training step ran forward + backward at
80-96 GFLOP/s through MKL against 147-188 GFLOP/s through oneDNN (forward alone 210-250), with
the same results up to float32 rounding (docs/cmssm.md has the measurements).

:func:`linear`, :func:`bmm` and :class:`Linear` (an ``nn.Linear`` with the same parameters and
state dict) send float32 CPU products to oneDNN when the backend says so, and everything else
(other dtypes, CUDA, CPU autocast, tracing, ONNX export, ``torch.compile``) to the usual
PyTorch op. The backend (:func:`set_fp32_matmul_backend`, or the environment variable
``LESIONKIT_FP32_MATMUL``):

- ``auto`` (default): oneDNN on AMD processors whose cores run AVX-512 at full width (Zen 5
  and later, where MKL's vendor dispatch leaves the wide units idle); PyTorch's own path
  elsewhere: Intel, where MKL takes its AVX-512 path, and Zen 4 or older AMD, where MKL's AVX2
  path has the core's peak (on a Zen 4, oneDNN was 1.03-1.11x on single products and 0.87-1.08x
  on whole training steps: docs/cmssm.md);
- ``onednn``: oneDNN wherever PyTorch has it;
- ``aten``: always PyTorch's own path.

The choice changes float32 rounding (a different summation order), never the maths; the
gradients are the textbook ones (dx = dy W, dW = dy^T x, db = sum dy) computed by the same
oneDNN products, and are not differentiable twice.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.host import cpu_info

__all__ = ["Linear", "bmm", "convert_linears", "describe_fp32_matmul_backend", "fp32_matmul_backend", "linear",
           "set_fp32_matmul_backend", "use_fp32_matmul_backend"]

BACKENDS = ("auto", "onednn", "aten")
_choice: str | None = None  # set_fp32_matmul_backend's choice; None: the environment variable


def _onednn_available() -> bool:
    """oneDNN built into this torch, its linear op present, and not switched off by the user
    (``torch.backends.mkldnn.enabled = False`` / ``torch.backends.mkldnn.flags(enabled=False)``)."""
    return (torch.backends.mkldnn.is_available() and bool(torch.backends.mkldnn.enabled)
            and hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> tuple[str, int, frozenset[str]]:
    """(vendor id, cpu family, flags) of the first CPU (lesionkit.host.cpu_info); ("", 0, {}) where
    unknown. Cached: ``auto`` asks on every large float32 product, and the flag set took 4 us to build."""
    info = cpu_info()
    family = info.get("cpu family", "")
    return info.get("vendor_id", ""), int(family) if family.isdigit() else 0, frozenset(info.get("flags", "").split())


# AMD's first family whose cores execute 512-bit instructions at full width (Zen 5, family 0x1A).
# Zen 4 (0x19) has AVX-512 on 256-bit units, the same peak as MKL's AVX2 path there: measured,
# oneDNN gained 0-8 % on whole fp32 training steps and lost 13 % on one (docs/cmssm.md), so
# ``auto`` leaves it on PyTorch's path.
AMD_FULL_WIDTH_FAMILY = 26


def _full_width_amd() -> bool:
    """An x86 AMD processor of family >= AMD_FULL_WIDTH_FAMILY with AVX-512 ."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    vendor, family, flags = _cpu_flags()
    return vendor == "AuthenticAMD" and family >= AMD_FULL_WIDTH_FAMILY and "avx512f" in flags


def _auto_backend() -> str:
    return "onednn" if _full_width_amd() and _onednn_available() else "aten"


def _requested() -> tuple[str, str]:
    """(the backend asked for, where it was asked): set_fp32_matmul_backend's choice, else the environment's."""
    if _choice is not None:
        return _choice, "set_fp32_matmul_backend"
    return os.environ.get("LESIONKIT_FP32_MATMUL", "auto"), "LESIONKIT_FP32_MATMUL"


def set_fp32_matmul_backend(name: str | None) -> None:
    """Choose the float32 CPU matmul backend: ``auto``, ``onednn``, ``aten``; None: the environment's."""
    global _choice
    if name is not None and name not in BACKENDS:
        raise ValueError(f"fp32 matmul backend must be one of {BACKENDS}, got {name!r}")
    _choice = name


@contextlib.contextmanager
def use_fp32_matmul_backend(name: str | None) -> Iterator[None]:
    """:func:`set_fp32_matmul_backend` inside a ``with`` block; the previous choice comes back after it."""
    global _choice
    previous = _choice
    set_fp32_matmul_backend(name)
    try:
        yield
    finally:
        _choice = previous


def fp32_matmul_backend() -> str:
    """The backend in force, resolved: ``onednn`` or ``aten``."""
    name, _ = _requested()
    if name not in BACKENDS:
        raise ValueError(f"LESIONKIT_FP32_MATMUL must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return _auto_backend()
    if name == "onednn" and not _onednn_available():
        return "aten"
    return name


# Products smaller than this many multiply-adds (per matrix) stay on PyTorch's path: a oneDNN
# call costs some 10-40 microseconds of set-up, more than such a product takes through MKL
# (the dt projection of ``vmunet_tiny``, 48 x 2 x 1024 per image and direction, ran 2-4x slower).
MIN_MACS = 1 << 22


def _plain_graph() -> bool:
    """Tracing, scripting, ONNX export, torch.compile: they see PyTorch's own ops."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export())


def describe_fp32_matmul_backend() -> str:
    """One line for ``lesionkit info``: the backend in force and why."""
    name, source = _requested()
    try:
        resolved = fp32_matmul_backend()
    except ValueError as err:
        return str(err)
    if name == "auto":
        vendor, family, flags = _cpu_flags()
        cpu = f"{vendor or 'unknown vendor'} family {family}, {'with' if 'avx512f' in flags else 'no'} AVX-512"
        return f"{resolved} ({source}=auto on {cpu})"
    return f"{resolved} ({source}={name})"


def _use_onednn(macs: int, *tensors: torch.Tensor) -> bool:
    if macs < MIN_MACS or torch.is_autocast_enabled("cpu"):
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return fp32_matmul_backend() == "onednn"


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T (+ bias) -> (M, N) contiguous; ``weight`` may be any 2-D view."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) -> (M, N): ``a`` is read row-major (copied if it is not), ``b`` as it is."""
    return _onednn_linear(a, b.t())


def _weight_grad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g (M, N)^T @ x (M, K) -> (N, K), by whichever way copies less.

    As linear(g^T, x^T) the (N, M) input g^T is copied row-major; as linear(x^T, g^T)^T the
    (K, M) input x^T is, and the (K, N) result transposed back (at (128, 768, 3072) that
    transpose alone made the backward 1.5x slower than the other way).
    """
    (m, k), n = x.shape, g.shape[1]
    if m * k + k * n < m * n:
        return _onednn_linear(x.t(), g.t()).t().contiguous()  # (x^T g)^T
    return _onednn_linear(g.t(), x.t())


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        ctx.in_shape = x.shape
        y = _onednn_linear(x2, weight, bias.contiguous() if bias is not None else None)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm(g2, weight).view(ctx.in_shape)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(x2, g2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


class _BmmFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return torch.stack([_mm(a[i], b[i]) for i in range(a.shape[0])])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        da = db = None
        if ctx.needs_input_grad[0]:  # grad @ b^T
            da = torch.stack([_onednn_linear(grad[i], b[i]) for i in range(a.shape[0])])
        if ctx.needs_input_grad[1]:  # a^T @ grad
            db = torch.stack([_mm(a[i].t(), grad[i]) for i in range(a.shape[0])])
        return da, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with float32 CPU products through oneDNN where the backend says so (module doc)."""
    if _plain_graph() or weight.dim() != 2:
        return F.linear(x, weight, bias)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if _use_onednn(x.numel() * weight.shape[0], *tensors):
        return _LinearFn.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm`` with float32 CPU products through oneDNN where the backend says so (module doc)."""
    if (not _plain_graph() and a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]
            and a.shape[2] == b.shape[1] and _use_onednn(a.shape[1] * a.shape[2] * b.shape[2], a, b)):
        return _BmmFn.apply(a, b)
    return torch.bmm(a, b)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and state dict) whose product is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def convert_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` inside ``module`` a :class:`Linear`, in place; returns ``module``.

    Parameters, state-dict keys, hooks and ``isinstance(m, nn.Linear)`` are unchanged; subclasses
    of ``nn.Linear`` (e.g. the output projection of ``nn.MultiheadAttention``) are left alone.
    ``lesionkit.create_model`` applies it to every model, so timm's ViT blocks inside SegMAE,
    TransUNet and the MAEs take the oneDNN path too.
    """
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module
