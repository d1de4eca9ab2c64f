"""GRCSF's two costs side by side (docs/grcsf.md): residual maps per second, and a training step
of grcsf_tiny against unetpp_tiny.

Maps: ``residual_maps`` of ``mae_vit_tiny`` at 128 px, ratios 0.5 / 0.75, 5 repeats. "before" is
the path as it was first built (one image per MAE forward, whole reconstructions averaged in
pixel space, fp32 with PyTorch's own float32 products; written out below with the library's
masks so it draws the same maskings); against it, the library's path in fp32 and bf16 with
``IMAGES_PER_FORWARD`` images per forward and fp32 with one (float32 products on the backend
``lesionkit.layers.linear`` picks for this CPU; once more with PyTorch's, to separate the two).
Cases alternate over the same images; reported images/s (median of the runs), the speed-ups
over "before" and the largest difference of each case's maps from it.

Step: forward + Dice/BCE + backward + AdamW, batch 8 at 128 px, in the tiny recipes' precision
(bf16 autocast, channels-last), GRCSF with two residual maps as input (cached maps, as in
training); cases round-robin, one step each per round, median over rounds. Also GRCSF without
RCU, without GCU and without the top stage's RCU, so the docs can say where the time goes. Load
recorded before and after.

    python benchmarks/grcsf_speed.py --threads 1 --out benchmarks/results/cpu-2core-xeon-grcsf-speed-1thread.json
    python benchmarks/grcsf_speed.py --threads 1 --maps-only     # the maps part alone
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
from lesionkit.layers.linear import use_fp32_matmul_backend
from lesionkit.layers.patch_masking import patch_mask_to_pixels, random_patch_mask
from lesionkit.layers.residual_maps import (IMAGES_PER_FORWARD, ResidualMapSettings, _image_generator, image_hash,
                                            residual, residual_maps)
from lesionkit.losses import create_loss
from lesionkit.models import create_model

STEP_CASES = {
    "unetpp_tiny": ("unetpp_tiny", {}),
    "grcsf_tiny": ("grcsf_tiny", {}),
    "grcsf_tiny, no RCU": ("grcsf_tiny", {"use_rcu": False}),
    "grcsf_tiny, no GCU": ("grcsf_tiny", {"use_gcu": False}),
    "grcsf_tiny, linear keys": ("grcsf_tiny", {"rcu_key_embed": "linear"}),
    "grcsf_tiny, no RCU at the top": ("grcsf_tiny", {"rcu_disconnected": (0,)}),
}


@torch.no_grad()
def maps_before(mae, images: torch.Tensor, settings: ResidualMapSettings) -> torch.Tensor:
    """The maps as first computed: each image's ``repeats`` maskings as one MAE batch, the whole
    reconstruction of each, and the mean over the maskings that hid a pixel taken in pixel space."""
    p, n = mae.patch_size, settings.repeats
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    out = []
    for image in images.float():
        gen = _image_generator(image_hash(image), settings.seed)
        maps = []
        for ratio in settings.ratios:
            pm = random_patch_mask(n, grid[0] * grid[1], ratio, generator=gen)
            recon = mae(image[None].expand(n, -1, -1, -1), mask=pm).reconstruction
            hidden = patch_mask_to_pixels(pm.mask, p, grid).float()
            count = hidden.sum(0)
            mean = torch.where(count > 0, (recon * hidden).sum(0) / count.clamp_min(1), image)
            maps.append(residual(image[None], mean[None], settings.kind)[0, 0])
        out.append(torch.stack(maps))
    return torch.stack(out).clamp(0, 1)


def maps_speed(images: int, runs: int, size: int) -> dict:
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny", img_size=size).eval()
    x = torch.rand(images, 3, size, size)
    fp32, bf16 = ResidualMapSettings(), ResidualMapSettings(precision="bf16")

    def aten(fn):  # PyTorch's own float32 products, as the path ran before lesionkit.layers.linear
        def run():
            with use_fp32_matmul_backend("aten"):
                return fn()
        return run

    cases = {
        "before: one image per forward, whole reconstructions, fp32": aten(lambda: maps_before(mae, x, fp32)),
        "now: one image per forward, fp32": lambda: residual_maps(mae, x, fp32, images_per_forward=1),
        f"now: {IMAGES_PER_FORWARD} images per forward, fp32, PyTorch's products":
            aten(lambda: residual_maps(mae, x, fp32)),
        f"now: {IMAGES_PER_FORWARD} images per forward, fp32": lambda: residual_maps(mae, x, fp32),
        f"now: {IMAGES_PER_FORWARD} images per forward, bf16": lambda: residual_maps(mae, x, bf16),
    }
    for run in cases.values():  # warm-up
        run()
    out: dict[str, list[float]] = {name: [] for name in cases}
    results = {}
    for _ in range(runs):
        for name, run in cases.items():
            t0 = time.perf_counter()
            results[name] = run()
            out[name].append(images / (time.perf_counter() - t0))
    before = next(iter(cases))
    base = statistics.median(out[before])
    rows = {name: {"images_per_s_median": statistics.median(v), "images_per_s_all": v,
                   "speedup_over_before": statistics.median(v) / base,
                   "max_abs_difference_from_before": (results[name] - results[before]).abs().max().item()}
            for name, v in out.items()}
    return {"images": images, "runs": runs, "size": size, "settings": "ratios 0.5/0.75, repeats 5, absdiff",
            "cases": rows}


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
    parser.add_argument("--map-runs", type=int, default=5)
    parser.add_argument("--maps-only", action="store_true", help="time the residual maps, not the steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    maps = maps_speed(args.map_images, args.map_runs, args.size)
    for name, row in maps["cases"].items():
        print(f"maps, {name}: {row['images_per_s_median']:.1f} images/s ({row['speedup_over_before']:.2f}x), "
              f"max |difference from before| {row['max_abs_difference_from_before']:.1e}", flush=True)
    rows = None
    if not args.maps_only:
        steps = {name: make_step(m, kw, args.size, args.batch) for name, (m, kw) in STEP_CASES.items()}
        for step, _ in steps.values():
            step()
        times = round_robin(steps, args.rounds)
        rows = step_rows(times, steps, args.batch, "unetpp_tiny")
    load_after = os.getloadavg()
    print(f"load before {load_before}, after {load_after}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(load_before, load_after),
                       "threads": args.threads, "size": args.size, "batch": args.batch, "rounds": args.rounds,
                       "maps": maps, "steps": rows}, f, indent=1)


if __name__ == "__main__":
    main()
