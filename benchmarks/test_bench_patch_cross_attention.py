"""patch_cross_attention: reference, what users write today (window partition copies + SDPA),
torch.compile of that, and the kernels; on a GPU also FlexAttention with a block mask.

Shapes (B, h, d, H, W) = (8, 1 | 4, 32 | 64, 56 | 112, 56 | 112) with P 8 and 16 (P 16 only
where it divides H); forward and forward + backward. On a CPU-only machine the default is the
subset h = 1, d = 64 (set LESIONKIT_BENCH_FULL=1 for all shapes): with torch.compile building
one graph per shape and mode, the full set takes most of an hour on two cores.
"""

import os

import pytest
import torch
from torch.nn import functional as F

import lesionkit.kernels as K
from lesionkit.kernels.backend import unavailable_reason
from lesionkit.kernels.reference.patch_cross_attention import merge_windows, partition_windows

from conftest import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = DEVICE.type == "cuda" or os.environ.get("LESIONKIT_BENCH_FULL") == "1"
CASES = [((8, h, d, s, s), p) for h in (1, 4) for d in (32, 64) for s in (56, 112) for p in (8, 16)
         if s % p == 0 and (FULL or (h, d) == (1, 64))]
PROVIDERS = ["reference", "sdpa_partition", "compile_sdpa_partition", "cpu", "cuda", "triton",
             "flex_attention"]


def sdpa_partition(q, k, v, patch_size):
    """Window attention as users write it: copy windows out, SDPA, copy back."""
    b, h, _, height, width = q.shape
    qw, kw, vw = (partition_windows(t, patch_size).flatten(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qw, kw, vw)
    return merge_windows(out.unflatten(1, (h, -1)), patch_size, height, width)


_compiled_sdpa = torch.compile(sdpa_partition, dynamic=False)
_block_masks: dict = {}


def flex_attention_windows(q, k, v, patch_size):
    """FlexAttention over the flattened map with a block mask keeping each window's pairs."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, d, height, width = q.shape
    key = (height, width, patch_size)
    if key not in _block_masks:
        def same_window(b_, h_, q_idx, kv_idx):
            return ((q_idx // width) // patch_size == (kv_idx // width) // patch_size) & (
                (q_idx % width) // patch_size == (kv_idx % width) // patch_size)

        length = height * width
        _block_masks[key] = (create_block_mask(same_window, None, None, length, length,
                                               device=q.device), torch.compile(flex_attention))
    mask, attend = _block_masks[key]
    seq = [t.flatten(3).transpose(-1, -2) for t in (q, k, v)]  # (B, h, H*W, d)
    out = attend(*seq, block_mask=mask)
    return out.transpose(-1, -2).reshape(b, h, v.shape[2], height, width)


def _attention_fn(provider):
    if provider == "sdpa_partition":
        return sdpa_partition
    if provider == "compile_sdpa_partition":
        return _compiled_sdpa
    if provider == "flex_attention":
        return flex_attention_windows if DEVICE.type == "cuda" else None
    if provider != "reference" and unavailable_reason("patch_cross_attention", provider, DEVICE):
        return None
    if provider == "triton" and DEVICE.type == "cpu":
        return None  # the interpreter is for correctness, not speed

    def fn(q, k, v, patch_size):
        with K.use_backend(provider):
            return K.patch_cross_attention(q, k, v, patch_size)

    return fn


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-P{c[1]}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_patch_cross_attention(benchmark, provider, case, mode, machine):
    fn = _attention_fn(provider)
    if fn is None:
        pytest.skip(f"{provider} unavailable on {DEVICE}")
    shape, patch = case
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE).requires_grad_(mode == "full")
               for _ in range(3))
    grad = torch.randn(shape, generator=gen).to(DEVICE)

    def step():
        if mode == "full":
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v, patch).backward(grad)
        else:
            with torch.no_grad():
                fn(q, k, v, patch)
        synchronize(DEVICE)

    for _ in range(3):  # warm-up, and compilation for the compiled providers
        step()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"patch_cross_attention {mode} {'x'.join(map(str, shape))} P{patch}"
    benchmark.extra_info.update(
        op="patch_cross_attention", provider=provider, mode=mode, shape=list(shape),
        patch_size=patch, machine=machine, device=str(DEVICE),
        threads=torch.get_num_threads(), load_average=list(os.getloadavg()),
    )
    benchmark.pedantic(step, rounds=10 if DEVICE.type == "cpu" else 100, iterations=1,
                       warmup_rounds=1)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
