"""selective_scan and selective_scan_2d at the VM-UNet shapes (docs/ops.md).

Stages (L, K*D) = (4096, 768), (1024, 1536), (256, 3072), (64, 6144) with N = 16 and g = K = 4;
batch 1 on CPU (latency), 32 on GPU (training). Providers: ``reference-loop`` (the vectorised
PyTorch loop over l, the baseline that the issue's speed-ups are measured against),
``reference`` (the chunked log-space scan), ``cpu``, ``cuda``; for selective_scan_2d also
``unfused`` (cross_scan -> selective_scan -> cross_merge on the best kernel backend). Forward
and forward+backward ("full"); extra_info carries state updates per second.

    pytest benchmarks/test_bench_selective_scan.py --benchmark-json benchmarks/results/<machine>.json
    LESIONKIT_BENCH_STAGES=1 pytest ...   # stage 1 only
"""

import os

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels.backend import unavailable_reason
from lesionkit.kernels.reference.selective_scan import selective_scan_sequential_reference

from conftest import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 32 if DEVICE.type == "cuda" else 1
N, GROUPS = 16, 4
ALL_STAGES = {1: (4096, 768), 2: (1024, 1536), 3: (256, 3072), 4: (64, 6144)}
STAGES = [ALL_STAGES[int(s)] for s in os.environ.get("LESIONKIT_BENCH_STAGES", "1,2,3,4").split(",")]
PROVIDERS = ["reference-loop", "reference", "cpu", "cuda", "triton"]
PROVIDERS_2D = ["reference", "unfused", "cpu", "cuda"]


def _available(op, provider):
    if provider in ("reference", "reference-loop"):
        return True
    if provider == "triton" and DEVICE.type == "cpu":
        return False  # the interpreter is for correctness, not speed
    return unavailable_reason(op, provider, DEVICE) is None


def _rounds(provider, length):
    if provider == "reference-loop":
        return 2 if length >= 1024 else 5
    return 10 if DEVICE.type == "cpu" else 50


def _run(benchmark, step, provider, length, info):
    for _ in range(0 if provider.startswith("reference") else 3):
        step()  # warm-up (eager PyTorch has nothing to warm up beyond the allocator)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.extra_info.update(info)
    benchmark.pedantic(step, rounds=_rounds(provider, length), iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    benchmark.extra_info["state_updates_per_s"] = info["state_updates"] / median
    benchmark.extra_info["GB_per_s_at_min_bytes"] = info["min_bytes"] / median / 1e9
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()


def scan_inputs(length, channels, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    b = BATCH
    return dict(
        u=torch.randn(b, channels, length, generator=gen),
        delta=torch.rand(b, channels, length, generator=gen) * 0.5,
        A=-torch.rand(channels, N, generator=gen) * 0.5 - 0.1,
        B=torch.randn(b, GROUPS, N, length, generator=gen),
        C=torch.randn(b, GROUPS, N, length, generator=gen),
        D=torch.randn(channels, generator=gen),
        delta_bias=torch.rand(channels, generator=gen) * 0.5,
    ), dtype


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"L{s[0]}-KD{s[1]}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_selective_scan(benchmark, provider, stage, mode, machine):
    if not _available("selective_scan", provider):
        pytest.skip(f"{provider} unavailable on {DEVICE}")
    length, channels = stage
    raw, dtype = scan_inputs(length, channels)
    kw = {k: v.to(DEVICE) for k, v in raw.items()}
    if mode == "full":
        for name in ("u", "delta", "A", "B", "C", "D"):
            kw[name].requires_grad_()
    grad = torch.randn(BATCH, channels, length, device=DEVICE)

    def call():
        if provider == "reference-loop":
            return selective_scan_sequential_reference(**kw, delta_softplus=True)
        with K.use_backend(provider):
            return K.selective_scan(**kw, delta_softplus=True)

    def step():
        if mode == "full":
            for name in ("u", "delta", "A", "B", "C", "D"):
                kw[name].grad = None
            call().backward(grad)
        else:
            with torch.no_grad():
                call()
        synchronize(DEVICE)

    benchmark.group = f"selective_scan {mode} L{length} KD{channels} N{N} b{BATCH}"
    b = BATCH
    _run(benchmark, step, provider, length, dict(
        op="selective_scan", provider=provider, mode=mode, shape=[b, channels, length, N, GROUPS],
        machine=machine, device=str(DEVICE), threads=torch.get_num_threads(),
        state_updates=b * channels * length * N,
        # Memory floor of the forward (docs/ops.md): u, delta, B, C read once, out written.
        min_bytes=4 * (3 * b * channels * length + 2 * b * GROUPS * N * length)))


def scan_2d_inputs(length, channels):
    side = int(length ** 0.5)
    dim = channels // 4
    gen = torch.Generator().manual_seed(0)
    b = BATCH
    return dict(
        x=torch.randn(b, dim, side, side, generator=gen),
        dt=torch.rand(b, 4, dim, side, side, generator=gen) * 0.5,
        A=-torch.rand(4, dim, N, generator=gen) * 0.5 - 0.1,
        B=torch.randn(b, 4, N, side, side, generator=gen),
        C=torch.randn(b, 4, N, side, side, generator=gen),
        D=torch.randn(4, dim, generator=gen),
        dt_bias=torch.rand(4, dim, generator=gen) * 0.5,
    )


def _unfused(x, dt, A, B, C, D, dt_bias):
    from lesionkit.kernels.reference.selective_scan import directions_to_sequences

    b, dim, h, w = x.shape
    xs = K.cross_scan(x).reshape(b, 4 * dim, h * w)
    ys = K.selective_scan(xs, directions_to_sequences(dt).reshape(b, 4 * dim, h * w),
                          A.reshape(4 * dim, -1), directions_to_sequences(B),
                          directions_to_sequences(C), D.reshape(-1), None, dt_bias.reshape(-1),
                          True)
    return K.cross_merge(ys.view(b, 4, dim, h * w), h, w)


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"L{s[0]}-KD{s[1]}")
@pytest.mark.parametrize("provider", PROVIDERS_2D)
def test_selective_scan_2d(benchmark, provider, stage, mode, machine):
    backend = "cuda" if DEVICE.type == "cuda" else "cpu"
    if provider == "unfused" and not _available("selective_scan", backend):
        pytest.skip(f"{backend} unavailable on {DEVICE}")
    if provider not in ("reference", "unfused") and not _available("selective_scan_2d", provider):
        pytest.skip(f"{provider} unavailable on {DEVICE}")
    length, channels = stage
    kw = {k: v.to(DEVICE) for k, v in scan_2d_inputs(length, channels).items()}
    if mode == "full":
        for t in kw.values():
            t.requires_grad_()
    grad = torch.randn_like(kw["x"])

    def call():
        if provider == "unfused":
            with K.use_backend(backend):
                return _unfused(**kw)
        with K.use_backend(provider):
            return K.selective_scan_2d(**kw)

    def step():
        if mode == "full":
            for t in kw.values():
                t.grad = None
            call().backward(grad)
        else:
            with torch.no_grad():
                call()
        synchronize(DEVICE)

    benchmark.group = f"selective_scan_2d {mode} L{length} KD{channels} N{N} b{BATCH}"
    b, dim = BATCH, channels // 4
    _run(benchmark, step, provider, length, dict(
        op="selective_scan_2d", provider=provider, mode=mode, shape=[b, dim, length, N],
        machine=machine, device=str(DEVICE), threads=torch.get_num_threads(),
        state_updates=b * 4 * dim * length * N,
        # Fused floor: x and out once, dt (4 directions), B and C once each.
        min_bytes=4 * (2 * b * dim * length + 4 * b * dim * length + 2 * b * 4 * N * length)))
