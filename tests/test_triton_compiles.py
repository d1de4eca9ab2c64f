"""Every Triton kernel launch the ops make compiles for a Hopper GPU (sm_90), on a machine without one.

Without a GPU the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``), which executes
them as Python and so misses what only the compiler rejects: a loop-carried variable whose type
changes between iterations (the first GPU run found one in the patch attention kernels), a
``tl.dot`` on a tile below 16, a dtype the backend cannot lower. Here each launch is recorded as
the interpreter runs it (kernel, argument types, constexprs, launch options), and a subprocess
without the interpreter compiles every distinct one to a cubin for sm_90 with Triton's own
ptxas. No GPU is needed; on a machine with one the real tests compile and run the kernels.
"""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels.backend import triton_interpreted, unavailable_reason

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or not triton_interpreted()
    or unavailable_reason("cross_scan", "triton", torch.device("cpu")) is not None,
    reason="runs where Triton is interpreted on the CPU; a GPU machine compiles the kernels itself",
)

_POINTER = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
            torch.uint8: "u8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages")


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def _encode(value):
    """A constexpr value in a form that pickles across processes (tl.dtype by name)."""
    import triton.language as tl
    return ("dtype", value.name) if isinstance(value, tl.dtype) else value


def _signature(fn, args, kwargs) -> tuple[dict, dict, dict]:
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip((p.name for p in params), args))
    bound.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    signature, constexprs = {}, {}
    for p in params:
        value = bound.get(p.name, p.default)
        if _is_constexpr(p) or value is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = _encode(value)
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={value!r}")
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    return signature, constexprs, options


@pytest.fixture
def recorded_launches(monkeypatch):
    """{(module, kernel, signature, constexprs, options)} of lesionkit's interpreted launches."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        if fn.__module__.startswith("lesionkit."):
            sig, consts, opts = _signature(fn, args, kwargs)
            key = (fn.__module__, fn.__name__, tuple(sig.items()), tuple(sorted(consts.items())),
                   tuple(sorted(opts.items())))
            launches[key] = (fn.__module__, fn.__name__, sig, consts, opts)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return launches


def _exercise_every_triton_path(monkeypatch) -> None:
    """Forward and backward of each op with a Triton kernel, in each dtype and on each path the
    wrappers choose between (mask or not, window sizes up to GRCSF's P = 16, every attention tile
    shape the block chooser can pick, k-means inits)."""
    from lesionkit.kernels.triton import patch_cross_attention as pca

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    with K.use_backend("triton"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = rand(1, 2, 4, 6, dtype=dtype, grad=True)
            K.cross_scan(x).float().sum().backward()
            y = rand(1, 4, 2, 24, dtype=dtype, grad=True)
            K.cross_merge(y, 4, 6).float().sum().backward()
            for mask in (None, torch.tensor([[True, False, True, True]])):
                pred = rand(1, 2, 16, 16, dtype=dtype, grad=True)
                target = torch.rand(1, 2, 16, 16, generator=gen).to(dtype)
                for detach in (False, True):
                    K.patchwise_softmax_loss(pred, target, 8, 0.5, mask=mask,
                                             detach_weights=detach).float().backward()
            for patch in (2, 4, 16):
                q, k, v = (rand(1, 1, 3, patch, patch, dtype=dtype, grad=True) for _ in range(3))
                K.patch_cross_attention(q, k, v, patch).float().square().sum().backward()
            points = rand(2, 9, 3, dtype=dtype)
            for init in ("kmeans++", "farthest"):
                K.kmeans(points, k=3, iters=2, init=init, seed=0)
        K.kmeans(rand(2, 9, 3, dtype=torch.float64), k=2, iters=2, seed=0)
        # Each (BLOCK_M, BLOCK_N) tile: a shared-memory budget that fits exactly that one. On a
        # GPU the tile depends on the channels, the dtype and the device's shared memory.
        for block_m, block_n in pca._TILES:
            budget = pca.shared_bytes(block_m, block_n, 16, 16, 4, 1)
            assert pca.block_sizes(16, 3, 3, 4, budget)["BLOCK_N"] == block_n
            monkeypatch.setattr(pca, "shared_memory_budget", lambda device, b=budget: b)
            q, k, v = (rand(1, 1, 3, 16, 16, grad=True) for _ in range(3))
            K.patch_cross_attention(q, k, v, 16).square().sum().backward()


_COMPILE = r"""
import importlib, pickle, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

failures = []
for module, name, signature, constexprs, options in pickle.load(sys.stdin.buffer):
    fn = getattr(importlib.import_module(module), name)
    consts = {k: (tl.dtype(v[1]) if isinstance(v, tuple) and v[:1] == ("dtype",) else v)
              for k, v in constexprs.items()}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                target=GPUTarget("cuda", 90, 32), options=options)
        assert kernel.asm.get("cubin"), "no cubin"
    except Exception as e:  # report every failing launch, not the first
        failures.append(f"{name} {constexprs} {options}: {type(e).__name__}: {str(e)[:1500]}")
print("\n\n".join(failures) if failures else "compiled")
sys.exit(1 if failures else 0)
"""


def test_every_recorded_triton_launch_compiles_for_sm90(recorded_launches, monkeypatch):
    from lesionkit.kernels.triton import patch_cross_attention as pca

    _exercise_every_triton_path(monkeypatch)
    kernels = {key[:2] for key in recorded_launches}
    tiles = {(c["BLOCK_M"], c["BLOCK_N"]) for _, name, _, c, _ in recorded_launches.values()
             if name == "_forward_kernel" and "BLOCK_M" in c}
    assert tiles >= set(pca._TILES), tiles
    # Every kernel module the ops launch from took part (a new op must be exercised above).
    assert {m.rsplit(".", 1)[1] for m, _ in kernels} == {
        "cross_scan", "patchwise_softmax_loss", "patch_cross_attention", "kmeans"}, kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE],
                          input=pickle.dumps(list(recorded_launches.values())),
                          capture_output=True, env=env, timeout=900)
    out = proc.stdout.decode() + proc.stderr.decode()[-3000:]
    assert proc.returncode == 0, out
