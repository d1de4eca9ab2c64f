"""Training-step time of vmunet_tiny and cmssm_tiny variants, side by side (docs/cmssm.md).

One step = forward (with the block outputs when distilling) + BCE 0.3 / Dice 0.7 (+ CFD + IFD,
0.015 each) + backward + AdamW, batch 8 at 128 px, fp32, on the compiled cpu scan kernel. The
cases run round-robin, one step each per round, so that every case sees the same machine load;
reported: the median over rounds and the ratio to vmunet_tiny's median. Load is recorded before
and after (quote a ratio only when the load stayed below the core count).

    python benchmarks/cmssm_step_time.py --threads 1 --rounds 12 --out benchmarks/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from lesionkit.engine.builders import build_optimizer  # as the trainer builds it (fused AdamW where torch has it)
from lesionkit.engine.config import OptimConfig
from lesionkit.losses import create_loss
from lesionkit.losses.feature_distillation import FeatureDistillation
from lesionkit.models import create_model

# name -> (model, model kwargs, distillation maps or None)
CASES = {
    "vmunet_tiny": ("vmunet_tiny", {}, None),
    "cmssm_tiny (CMN ratio 4, FD per block)": ("cmssm_tiny", {}, "blocks"),
    "cmssm_tiny, CMN ratio 2": ("cmssm_tiny", {"cmn_ratio": 2.0}, "blocks"),
    "cmssm_tiny, CMN ratio 1": ("cmssm_tiny", {"cmn_ratio": 1.0}, "blocks"),
    "cmssm_tiny, FD per stage": ("cmssm_tiny", {}, "stages"),
    "cmssm_tiny, no FD": ("cmssm_tiny", {}, None),
    "cmssm_tiny, no CMN": ("cmssm_tiny", {"cmn": False}, "blocks"),
}


def make_step(model_name: str, kwargs: dict, maps: str | None, size: int, batch: int):
    torch.manual_seed(0)
    model = create_model(model_name, **kwargs).train()
    opt = build_optimizer(OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-2), model)
    loss_fn = create_loss("bce_dice", bce_weight=0.3, dice_weight=0.7)
    fd = FeatureDistillation(maps=maps) if maps else None
    x = torch.rand(batch, 3, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.5).float()

    def step():
        if fd is None:
            loss = loss_fn(model(x), y)
        else:
            logits, features = model.forward_intermediates(x)
            loss = loss_fn(logits, y) + sum(fd(features, model.block_names()).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def round_robin(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each case's step per round; the cases alternate so each sees the same load."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, _) in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def step_rows(times: dict[str, list[float]], steps: dict, batch: int, base: str) -> list[dict]:
    """The median per case and its ratio to ``base``'s, printed as table rows and returned."""
    base_median = statistics.median(times[base])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"case": name, "params": steps[name][1], "s_median": med, "s_all": ts,
                     "images_per_s": batch / med, f"time_vs_{base}": med / base_median})
        print(f"| {name} | {steps[name][1]:,} | {med:.3f} | {batch / med:.1f} | {med / base_median:.2f}x |", flush=True)
    return rows


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The options every step-timing script here takes: --threads, --size, --batch, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out")
    return parser


def cpu_model() -> str:
    """The CPU's model name and vector extensions (the timings depend on both: AVX-512 / AVX2,
    native bf16 or not)."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    try:  # the test precision "auto" uses (docs/engine.md)
        from lesionkit.engine.evaluation import native_bf16
        native = native_bf16(torch.device("cpu"))
    except ImportError:  # a lesionkit from before precision "auto", timed for comparison
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return f"{name or platform.processor()}; torch kernels {torch.backends.cpu.get_cpu_capability()}; " \
           f"native bf16 {'yes' if native else 'no'}"


def machine(load_before: tuple, load_after: tuple) -> dict:
    """The "machine" record of the results JSON: processor, cores, torch, load around the timing."""
    return {"processor": platform.processor() or platform.machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "load_average_before": load_before, "load_average_after": load_after}


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {name: make_step(m, kw, maps, args.size, args.batch) for name, (m, kw, maps) in CASES.items()}
    for step, _ in steps.values():  # warm-up
        step()
    load_before = os.getloadavg()
    times = round_robin(steps, args.rounds)
    load_after = os.getloadavg()
    rows = step_rows(times, steps, args.batch, "vmunet_tiny")
    print(f"load before {load_before}, after {load_after}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(load_before, load_after),
                       "threads": args.threads, "size": args.size, "batch": args.batch, "rounds": args.rounds,
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
