"""The CPU targets at the VM-UNet stages (b = 1, N = 16, g = 4; stage 1 is K*D = 768, L = 4096):
the cpu kernel against the vectorised PyTorch loop, forward and forward+backward, timed
interleaved in one process (min of the repeats), so that a machine shared with other jobs slows
both alike. The load average before and after the run is recorded with the result.

    python benchmarks/selective_scan_stage1.py --threads 2 --out benchmarks/results/<name>.json
    python benchmarks/selective_scan_stage1.py --stages 1,2,3,4 ...   # every stage, one run
"""

import argparse
import json
import os
import time

import torch

import lesionkit.kernels as K
from lesionkit.kernels.reference.selective_scan import selective_scan_sequential_reference

from conftest import machine_name

B, N, G = 1, 16, 4
STAGES = {1: (4096, 768), 2: (1024, 1536), 3: (256, 3072), 4: (64, 6144)}  # (L, K*D)


def run_stage(stage: int, repeats: int) -> dict:
    L, D = STAGES[stage]
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
    # Wall time, and the process's CPU time: on a machine shared with other jobs the CPU time
    # of a 1-thread run counts only this process's work, so its ratios are the stable ones.
    times = {k: [] for k in cases}
    cpu_times = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            for _ in range(1 if name.startswith("loop") else 4):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - start_cpu)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu_times.items()}
    updates = B * D * L * N
    return {
        "shape": {"b": B, "KD": D, "L": L, "N": N, "g": G},
        "min_ms": {k: v * 1e3 for k, v in best.items()},
        "min_cpu_ms": {k: v * 1e3 for k, v in best_cpu.items()},
        "all_ms": {k: [x * 1e3 for x in v] for k, v in times.items()},
        "speedup_forward": best["loop_forward"] / best["cpu_forward"],
        "speedup_full": best["loop_full"] / best["cpu_full"],
        "speedup_forward_cpu_time": best_cpu["loop_forward"] / best_cpu["cpu_forward"],
        "speedup_full_cpu_time": best_cpu["loop_full"] / best_cpu["cpu_full"],
        "backward_over_forward": (best["cpu_full"] - best["cpu_forward"]) / best["cpu_forward"],
        "backward_over_forward_cpu_time":
            (best_cpu["cpu_full"] - best_cpu["cpu_forward"]) / best_cpu["cpu_forward"],
        "state_updates_per_s": {k: updates / v for k, v in best.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stages", default="1", help="comma-separated VM-UNet stages (1-4)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    stages = {f"stage{s}": run_stage(int(s), args.repeats) for s in args.stages.split(",")}
    result = {"machine": machine_name(), "threads": args.threads, "torch": torch.__version__,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), **stages}
    for name, r in stages.items():
        print(name, json.dumps({k: r[k] for k in (
            "min_ms", "min_cpu_ms", "speedup_forward", "speedup_full", "speedup_forward_cpu_time",
            "speedup_full_cpu_time", "backward_over_forward", "backward_over_forward_cpu_time")}))
    print("load average before / after:", load_before, result["loadavg_after"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
