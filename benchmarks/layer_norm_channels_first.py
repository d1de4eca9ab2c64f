"""lesionkit's LayerNorm on a channels-first view, read in place against a row copy first
(docs/cmssm.md, "SS2D's out_norm on the scan's output in place").

x = y.permute(0, 2, 3, 1) of a contiguous (B, C, H, W) y, as SS2D's out_norm receives the
scan's output; per call, ms, the minimum over rounds of the mean of ``--calls`` calls:
forward + backward (to y, weight and bias) and forward alone, ``in place`` (the kernel reads
the view) against ``rows`` (``x.contiguous()`` first, as the layer ran before).

    python benchmarks/layer_norm_channels_first.py --threads 1 --out benchmarks/results/NAME.json
"""

from __future__ import annotations

import json
import os
import time

import torch
from cmssm_step_time import machine, step_arguments  # the "machine" record of docs/cmssm.md

import lesionkit.kernels as K

SHAPES = [((2, 192, 64, 64), "float32"), ((8, 48, 32, 32), "float32"),
          ((8, 48, 32, 32), "bfloat16"), ((8, 96, 16, 16), "bfloat16")]


def per_call_ms(fn, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for shape, dtype_name in SHAPES:
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(0)
        y = torch.randn(shape, generator=g).to(dtype).requires_grad_()
        c = shape[1]
        w = torch.randn(c, generator=g).requires_grad_()
        b = torch.randn(c, generator=g).requires_grad_()
        cotangent = torch.randn(shape[0], shape[2], shape[3], c, generator=g).to(dtype)
        variants = {"in place": lambda: y.permute(0, 2, 3, 1), "rows": lambda: y.permute(0, 2, 3, 1).contiguous()}
        result = {"shape": list(shape), "dtype": dtype_name}
        for name, view in variants.items():
            def both(view=view):
                K.layer_norm_last(view(), w, b, 1e-5).backward(cotangent)

            def forward(view=view):
                with torch.no_grad():
                    K.layer_norm_last(view(), w, b, 1e-5)

            result[f"{name} fwd+bwd ms"] = min(per_call_ms(both, args.calls) for _ in range(args.rounds))
            result[f"{name} fwd ms"] = min(per_call_ms(forward, args.calls) for _ in range(args.rounds))
        rows.append(result)
        print(f"{tuple(shape)} {dtype_name}: in place {result['in place fwd+bwd ms']:.3f} "
              f"({result['in place fwd ms']:.3f}) ms, rows {result['rows fwd+bwd ms']:.3f} "
              f"({result['rows fwd ms']:.3f}) ms  [forward + backward (forward)]")
    load_after = os.getloadavg()
    print(f"load before {load_before}, after {load_after}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(load_before, load_after), "threads": args.threads, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
