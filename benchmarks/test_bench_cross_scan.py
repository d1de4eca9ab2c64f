"""cross_scan and cross_merge at the VM-UNet SS2D shapes (docs/ss2d.md).

Stages (C, H = W) = (192, 64), (384, 32), (768, 16), (1536, 8): the inner width D of each stage's
SS2D block and its feature map; batch 1 on CPU, 32 on GPU. Providers: ``reference`` (stack and
flip in eager PyTorch), ``compile`` (torch.compile of the reference), ``cpu``, ``cuda``,
``triton``. Forward and forward+backward ("full", each op's backward is the other); both ops
only move memory, so extra_info carries the bandwidth at the minimum traffic.

    pytest benchmarks/test_bench_cross_scan.py --benchmark-json benchmarks/results/<machine>.json
"""

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels.backend import unavailable_reason
from lesionkit.kernels.reference.cross_scan import cross_merge_reference, cross_scan_reference

from conftest import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 32 if DEVICE.type == "cuda" else 1
STAGES = [(192, 64), (384, 32), (768, 16), (1536, 8)]
PROVIDERS = ["reference", "compile", "cpu", "cuda", "triton"]

_compiled = {"cross_scan": torch.compile(cross_scan_reference, dynamic=False),
             "cross_merge": torch.compile(cross_merge_reference, dynamic=False)}


def _op_fn(op, provider):
    if provider == "compile":
        return _compiled[op]
    if provider != "reference" and unavailable_reason(op, provider, DEVICE):
        return None
    if provider == "triton" and DEVICE.type == "cpu":
        return None  # the interpreter is for correctness, not speed
    fn = getattr(K, op)

    def call(*args):
        with K.use_backend(provider):
            return fn(*args)

    return call


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"C{s[0]}-{s[1]}x{s[1]}")
@pytest.mark.parametrize("op", ["cross_scan", "cross_merge"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cross_scan(benchmark, provider, op, stage, mode, machine):
    fn = _op_fn(op, provider)
    if fn is None:
        pytest.skip(f"{provider} unavailable on {DEVICE}")
    channels, side = stage
    gen = torch.Generator().manual_seed(0)
    if op == "cross_scan":
        inp = torch.randn(BATCH, channels, side, side, generator=gen)
        args = ()
    else:
        inp = torch.randn(BATCH, 4, channels, side * side, generator=gen)
        args = (side, side)
    inp = inp.to(DEVICE).requires_grad_(mode == "full")
    out_numel = inp.numel() * 4 if op == "cross_scan" else inp.numel() // 4
    grad = torch.randn(out_numel, device=DEVICE)

    def step():
        if mode == "full":
            inp.grad = None
            out = fn(inp, *args)
            out.backward(grad.view(out.shape))
        else:
            with torch.no_grad():
                fn(inp, *args)
        synchronize(DEVICE)

    for _ in range(3):  # warm-up, and compilation for the compile provider
        step()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # The memory floor: the input read and the output written once (the backward the same again,
    # with the roles of the two sizes swapped).
    min_bytes = (inp.numel() + out_numel) * inp.element_size() * (1 if mode == "forward" else 2)
    benchmark.group = f"{op} {mode} C{channels} {side}x{side} b{BATCH}"
    benchmark.extra_info.update(op=op, provider=provider, mode=mode,
                                shape=[BATCH, channels, side, side], machine=machine,
                                device=str(DEVICE), threads=torch.get_num_threads(),
                                min_bytes=min_bytes)
    benchmark.pedantic(step, rounds=20 if DEVICE.type == "cpu" else 100, iterations=1,
                       warmup_rounds=0)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB_per_s_at_min_bytes"] = min_bytes / benchmark.stats.stats.median / 1e9
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
