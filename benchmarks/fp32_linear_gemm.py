"""float32 linear forward + backward through PyTorch's path (MKL) and oneDNN, per shape (docs/cmssm.md).

The shapes are those of ``vmunet``'s products at 256 px, batch 2 (in-projections, out-projections,
MLPs and patch merging; M = pixels, K = in features, N = out features). Each shape runs
``lesionkit.layers.linear.linear`` forward and backward (dx and dW) on both backends,
alternating, and reports the median time and GFLOP/s (6 M K N flops per forward + backward).

    python benchmarks/fp32_linear_gemm.py --threads 1 --out benchmarks/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from cmssm_step_time import machine

from lesionkit.layers import linear as L

SHAPES = [(8192, 96, 384), (8192, 192, 96), (2048, 192, 768), (2048, 384, 192), (512, 384, 1536),
          (512, 768, 384), (128, 768, 3072), (128, 1536, 768)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for m, k, n in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g, requires_grad=True)
        w = torch.randn(n, k, generator=g, requires_grad=True)
        dy = torch.randn(m, n, generator=g)
        times: dict[str, list[float]] = {"aten": [], "onednn": []}
        for i in range(args.repeats + 2):
            for backend in times:
                L.set_fp32_matmul_backend(backend)
                t0 = time.perf_counter()
                torch.autograd.grad(L.linear(x, w), (x, w), dy)
                if i >= 2:
                    times[backend].append(time.perf_counter() - t0)
        L.set_fp32_matmul_backend(None)
        row = {"M": m, "K": k, "N": n}
        for backend, ts in times.items():
            med = statistics.median(ts)
            row[f"{backend}_ms"] = med * 1e3
            row[f"{backend}_gflops"] = 6 * m * k * n / med / 1e9
        row["onednn_speedup"] = row["aten_ms"] / row["onednn_ms"]
        rows.append(row)
        print(f"M {m:5d} K {k:5d} N {n:5d}: aten {row['aten_ms']:6.2f} ms ({row['aten_gflops']:5.1f} GFLOP/s), "
              f"oneDNN {row['onednn_ms']:6.2f} ms ({row['onednn_gflops']:5.1f} GFLOP/s), {row['onednn_speedup']:.2f}x")
    load_after = os.getloadavg()
    print(f"load before {load_before}, after {load_after}; auto resolves to {L.fp32_matmul_backend()!r} here")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(load_before, load_after), "threads": args.threads,
                       "auto_backend": L.fp32_matmul_backend(), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
