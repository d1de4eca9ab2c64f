"""patchwise_softmax_loss: reference (eager), torch.compile of the reference, and the kernels.

Shapes (B in 8 | 32, C in 1 | 3, H = W in 224 | 256), patch 16; forward and forward+backward.
"""

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels.backend import unavailable_reason
from lesionkit.kernels.reference.patchwise_softmax_loss import (
    patchwise_softmax_loss_per_image_reference,
)

from conftest import synchronize

SHAPES = [(b, c, s, s) for b in (8, 32) for c in (1, 3) for s in (224, 256)]
PATCH, BETA = 16, 0.1
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = ["reference", "compile", "cpu", "cuda", "triton"]

_compiled = torch.compile(patchwise_softmax_loss_per_image_reference, dynamic=False)


def _loss_fn(provider):
    if provider == "compile":
        return lambda p, t: _compiled(p, t, PATCH, BETA).mean()
    if provider != "reference" and unavailable_reason("patchwise_softmax_loss", provider, DEVICE):
        return None
    if provider == "triton" and DEVICE.type == "cpu":
        return None  # the interpreter is for correctness, not speed

    def fn(p, t):
        with K.use_backend(provider):
            return K.patchwise_softmax_loss(p, t, PATCH, BETA)

    return fn


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_patchwise_softmax_loss(benchmark, provider, shape, mode, machine):
    fn = _loss_fn(provider)
    if fn is None:
        pytest.skip(f"{provider} unavailable on {DEVICE}")
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(shape, generator=gen).to(DEVICE).requires_grad_(mode == "full")
    target = (torch.rand(shape, generator=gen) > 0.5).float().to(DEVICE)

    def step():
        if mode == "full":
            pred.grad = None
            fn(pred, target).backward()
        else:
            with torch.no_grad():
                fn(pred, target)
        synchronize(DEVICE)

    for _ in range(3):  # warm-up, and compilation for the compile provider
        step()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"patchwise_softmax_loss {mode} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(
        op="patchwise_softmax_loss", provider=provider, mode=mode, shape=list(shape),
        machine=machine, device=str(DEVICE),
        # The memory floor: one read of pred and target forward; one more read of both and a
        # gradient write backward.
        min_bytes=pred.numel() * pred.element_size() * (2 if mode == "forward" else 5),
    )
    benchmark.pedantic(step, rounds=20 if DEVICE.type == "cpu" else 100, iterations=1,
                       warmup_rounds=1)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
