"""GRCSF's two costs side by side (docs/grcsf.md): residual maps per second, and a training step
of grcsf_tiny against unetpp_tiny.

Maps: ``residual_maps`` of ``mae_vit_tiny`` at 128 px, ratios 0.5 / 0.75, 5 repeats, one image per
MAE forward (the old path) against ``IMAGES_PER_FORWARD`` images per forward, alternating runs
over the same images; reported images/s (median of the runs) and that the two agree.

Step: forward + Dice/BCE + backward + AdamW, batch 8 at 128 px, in the tiny recipes' precision
(bf16 autocast, channels-last), GRCSF with two residual maps as input (cached maps, as in
training); cases round-robin, one step each per round, median over rounds. Also GRCSF without
RCU and without GCU, so the docs can say where the time goes. Load recorded before and after.

    python benchmarks/grcsf_speed.py --threads 1 --out benchmarks/results/cpu-2core-xeon-grcsf-speed-1thread.json
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from cmssm_step_time import machine, round_robin, step_arguments, step_rows  # the side-by-side step timing of docs/cmssm.md

from lesionkit.engine.builders import build_optimizer  # as the trainer builds it (fused AdamW where torch has it)
from lesionkit.engine.config import OptimConfig
from lesionkit.layers.residual_maps import IMAGES_PER_FORWARD, ResidualMapSettings, residual_maps
from lesionkit.losses import create_loss
from lesionkit.models import create_model

STEP_CASES = {
    "unetpp_tiny": ("unetpp_tiny", {}),
    "grcsf_tiny": ("grcsf_tiny", {}),
    "grcsf_tiny, no RCU": ("grcsf_tiny", {"use_rcu": False}),
    "grcsf_tiny, no GCU": ("grcsf_tiny", {"use_gcu": False}),
    "grcsf_tiny, linear keys": ("grcsf_tiny", {"rcu_key_embed": "linear"}),
}


def maps_speed(images: int, runs: int, size: int) -> dict:
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny", img_size=size).eval()
    x = torch.rand(images, 3, size, size)
    settings = ResidualMapSettings()
    residual_maps(mae, x[:2], settings)  # warm-up
    out = {"one image per forward": [], f"{IMAGES_PER_FORWARD} images per forward": []}
    results = {}
    for _ in range(runs):
        for name, chunk in (("one image per forward", 1), (f"{IMAGES_PER_FORWARD} images per forward", IMAGES_PER_FORWARD)):
            t0 = time.perf_counter()
            results[name] = residual_maps(mae, x, settings, images_per_forward=chunk)
            out[name].append(images / (time.perf_counter() - t0))
    a, b = results.values()
    rows = {name: {"images_per_s_median": statistics.median(v), "images_per_s_all": v} for name, v in out.items()}
    speedup = rows[f"{IMAGES_PER_FORWARD} images per forward"]["images_per_s_median"] / rows["one image per forward"]["images_per_s_median"]
    return {"images": images, "runs": runs, "size": size, "settings": "ratios 0.5/0.75, repeats 5, absdiff",
            "cases": rows, "speedup": speedup, "max_abs_difference": (a - b).abs().max().item()}


def make_step(model_name: str, kwargs: dict, size: int, batch: int):
    torch.manual_seed(0)
    model = create_model(model_name, **kwargs).train().to(memory_format=torch.channels_last)
    opt = build_optimizer(OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4), model)
    loss_fn = create_loss("bce_dice")
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size) > 0.5).float()
    inputs = {"residual_maps": torch.rand(batch, 2, size, size) * 0.3} if model_name.startswith("grcsf") else {}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x, **inputs)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--map-images", type=int, default=48)
    parser.add_argument("--map-runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    maps = maps_speed(args.map_images, args.map_runs, args.size)
    for name, row in maps["cases"].items():
        print(f"maps, {name}: {row['images_per_s_median']:.1f} images/s", flush=True)
    print(f"maps speed-up {maps['speedup']:.2f}x, max |difference| {maps['max_abs_difference']:.2e}", flush=True)
    steps = {name: make_step(m, kw, args.size, args.batch) for name, (m, kw) in STEP_CASES.items()}
    for step, _ in steps.values():
        step()
    times = round_robin(steps, args.rounds)
    load_after = os.getloadavg()
    rows = step_rows(times, steps, args.batch, "unetpp_tiny")
    print(f"load before {load_before}, after {load_after}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(load_before, load_after),
                       "threads": args.threads, "size": args.size, "batch": args.batch, "rounds": args.rounds,
                       "maps": maps, "steps": rows}, f, indent=1)


if __name__ == "__main__":
    main()
