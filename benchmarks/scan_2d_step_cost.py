"""Nanoseconds per scan step of the fused SS2D kernel, forward and backward (docs/cmssm.md).

One scan step is one (batch, direction, channel, pixel): the state update h = exp(dt A) h + dt B x
of 16 states and its output. Shapes: `vmunet`'s first stage at 256 px, batch 2 (192 channels,
64 x 64) and the tiny models' at 128 px, batch 8 (48 channels, 32 x 32), float32 inputs.

To compare two builds of the kernel, build each into its own copy of the package and pass the
copies' parent folders with ``--lesionkit``; the script then runs them as separate processes,
alternating, so that the machine's drift falls on both alike:

    python benchmarks/scan_2d_step_cost.py --threads 1 --rounds 3 --lesionkit /tmp/a /tmp/b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from cmssm_step_time import machine
from quick_bench import make_inputs  # the op's inputs as the GPU check builds them

SHAPES = [(2, 192, 64), (8, 48, 32)]  # (batch, channels, side)


def measure(reps: int) -> list[dict]:
    """Median forward and backward time per scan step of ``lesionkit.kernels.selective_scan_2d``
    (the op and its registered backward, as a model calls them) at each of SHAPES."""
    rows = []
    for batch, dim, side in SHAPES:
        fn, tensors, _ = make_inputs("selective_scan_2d", (batch, dim, side, side, 16), torch.device("cpu"))
        tensors = [t.requires_grad_() for t in tensors]
        grad = torch.randn(batch, dim, side, side, generator=torch.Generator().manual_seed(0))
        fwd, bwd = [], []
        for i in range(reps + 1):  # the first call warms up
            t0 = time.perf_counter()
            out = fn(*tensors)
            t1 = time.perf_counter()
            torch.autograd.grad(out, tensors, grad)
            t2 = time.perf_counter()
            if i:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
        steps = batch * 4 * dim * side * side
        rows.append({"shape": f"({batch}, {dim}, {side} x {side})",
                     "forward_ns_per_step": statistics.median(fwd) / steps * 1e9,
                     "backward_ns_per_step": statistics.median(bwd) / steps * 1e9})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15, help="timed calls per shape (median)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations over --lesionkit")
    parser.add_argument("--lesionkit", nargs="*", default=[],
                        help="folders holding a built lesionkit package each (default: the installed one)")
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.reps)))
        return
    trees = args.lesionkit or [""]
    load_before = os.getloadavg()
    results: dict[str, list] = {t or "installed": [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p))
            cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--reps", str(args.reps)]
            rows = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            results[tree or "installed"].append(rows)
            print(tree or "installed", "  ".join(f"{r['shape']}: fwd {r['forward_ns_per_step']:.2f} "
                                                 f"bwd {r['backward_ns_per_step']:.2f} ns" for r in rows), flush=True)
    load_after = os.getloadavg()
    print(f"load before {load_before}, after {load_after}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(load_before, load_after), "threads": args.threads, "reps": args.reps,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
