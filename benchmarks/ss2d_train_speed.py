"""Training-step speed of the SS2D models against unet_tiny, side by side (docs/cmssm.md).

One step = forward + the recipe's loss (+ CFD / IFD for cmssm) + backward + AdamW, as
benchmarks/ss2d_step_profile.py builds it; each case is ``model:precision[+cl][@size:batch]``
(``bf16`` = CPU autocast as the trainer runs it, ``+cl`` channels-last). The cases run
round-robin, one step each per round, so that every case sees the same machine load; reported:
the median step, images/s and the ratio of images/s to the first case's. Load is recorded
before and after (quote a ratio only when the load stayed below the core count).

    python benchmarks/ss2d_train_speed.py --threads 1 --rounds 10 --out benchmarks/results/NAME.json
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from cmssm_step_time import machine, round_robin, step_arguments  # the side-by-side step timing of docs/cmssm.md
from ss2d_step_profile import make_step

DEFAULT_CASES = ["unet_tiny:bf16+cl", "vmunet_tiny:fp32", "vmunet_tiny:bf16", "cmssm_tiny:fp32", "cmssm_tiny:bf16"]


def parse(spec: str, size: int, batch: int) -> tuple[str, int, int]:
    name, _, shape = spec.partition("@")
    if shape:
        s, _, b = shape.partition(":")
        size, batch = int(s), int(b or batch)
    return name, size, batch


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    parser.add_argument("--label", default="", help="a name for this code version in the JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps, shapes = {}, {}
    for spec in args.cases:
        name, size, batch = parse(spec, args.size, args.batch)
        steps[spec] = (make_step(name, size, batch), None)
        shapes[spec] = (size, batch)
    first = {}
    for spec, (step, _) in steps.items():  # warm-up (with torch.compile: the compilation)
        t0 = time.perf_counter()
        step()
        first[spec] = time.perf_counter() - t0
    load_before = os.getloadavg()
    times = round_robin(steps, args.rounds)
    load_after = os.getloadavg()
    base = args.cases[0]
    base_ips = shapes[base][1] / statistics.median(times[base])
    rows = []
    for spec, ts in times.items():
        med = statistics.median(ts)
        ips = shapes[spec][1] / med
        rows.append({"case": spec, "size": shapes[spec][0], "batch": shapes[spec][1], "s_median": med, "s_all": ts,
                     "images_per_s": ips, "vs_first": ips / base_ips, "first_step_s": first[spec]})
        print(f"| {spec} | {med:.3f} | {ips:.1f} | {ips / base_ips:.2f}x | first step {first[spec]:.1f} s |", flush=True)
    print(f"load before {load_before}, after {load_after}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(load_before, load_after),
                       "label": args.label, "threads": args.threads, "rounds": args.rounds, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
