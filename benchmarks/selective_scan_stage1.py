"""The issue-4 CPU targets at VM-UNet stage 1 (b=1, K*D=768, L=4096, N=16, g=4): the cpu kernel
against the vectorised PyTorch loop, forward and forward+backward, timed interleaved in one
process (min of the repeats), so that a machine shared with other jobs slows both alike.

    python benchmarks/selective_scan_stage1.py --threads 1 --out benchmarks/results/<name>.json
"""

import argparse
import json
import time

import torch

import lesionkit.kernels as K
from lesionkit.kernels.reference.selective_scan import selective_scan_sequential_reference

from conftest import machine_name

B, D, L, N, G = 1, 768, 4096, 16, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    kw = dict(u=torch.randn(B, D, L, generator=gen), delta=torch.rand(B, D, L, generator=gen) * 0.5,
              A=-torch.rand(D, N, generator=gen) * 0.5 - 0.1,
              B=torch.randn(B, G, N, L, generator=gen), C=torch.randn(B, G, N, L, generator=gen),
              D=torch.randn(D, generator=gen), delta_bias=torch.rand(D, generator=gen) * 0.5)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(**kw, delta_softplus=True)
        return run

    def full(fn):
        def run():
            leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
            fn(**leaves, delta_softplus=True).sum().backward()
        return run

    def cpu(**a):
        with K.use_backend("cpu"):
            return K.selective_scan(**a)

    cases = {"cpu_forward": forward(cpu), "loop_forward": forward(selective_scan_sequential_reference),
             "cpu_full": full(cpu), "loop_full": full(selective_scan_sequential_reference)}
    cases["cpu_forward"](), cases["cpu_full"]()  # warm-up
    times = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            for _ in range(1 if name.startswith("loop") else 4):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    updates = B * D * L * N
    result = {
        "machine": machine_name(), "threads": args.threads, "torch": torch.__version__,
        "shape": {"b": B, "KD": D, "L": L, "N": N, "g": G},
        "min_ms": {k: v * 1e3 for k, v in best.items()},
        "all_ms": {k: [x * 1e3 for x in v] for k, v in times.items()},
        "speedup_forward": best["loop_forward"] / best["cpu_forward"],
        "speedup_full": best["loop_full"] / best["cpu_full"],
        "state_updates_per_s": {k: updates / v for k, v in best.items()},
    }
    print(json.dumps({k: result[k] for k in ("threads", "min_ms", "speedup_forward", "speedup_full",
                                             "state_updates_per_s")}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
