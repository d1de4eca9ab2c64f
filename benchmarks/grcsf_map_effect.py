"""How far a trained GRCSF's residual maps move its prediction (docs/grcsf.md).

For each checkpoint: validation Dice with the image's own maps, with the maps zeroed, and with
another image's maps (the batch rolled by one), and the mean |logit change| against the own
maps, on the cached maps of benchmarks/grcsf_isic2018_dev.sh.

    python benchmarks/grcsf_map_effect.py DEV_PATH RUNS/grcsf_s0/best.pt [...]
"""

from __future__ import annotations

import sys

import torch

from lesionkit.engine.builders import build_dataset, build_eval_transform
from lesionkit.engine.checkpoint import load_checkpoint, model_from_checkpoint
from lesionkit.engine.evaluation import per_image_dice
from lesionkit.layers.residual_maps import residual_maps


@torch.no_grad()
def effect(checkpoint: str, dev: str) -> dict:
    state = load_checkpoint(checkpoint)
    cfg = state["config"]
    model = model_from_checkpoint(state, checkpoint).eval()

    data = build_dataset(f"isic:{dev}:val", cfg["data"]["image_size"], build_eval_transform(cfg["data"]))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    sums = {"own": [0, 0, 0], "zero": [0, 0, 0], "other": [0, 0, 0]}  # intersection, total, per-image dice sum
    change = {"zero": 0.0, "other": 0.0}
    count = 0
    for batch in loader:
        x, y = batch["image"], batch["mask"]
        maps = residual_maps(model.mae, x, model.residual_settings)
        variants = {"own": maps, "zero": torch.zeros_like(maps), "other": maps.roll(1, dims=0)}
        own = None
        for name, m in variants.items():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x, residual_maps=m).float()
            if name == "own":
                own = logits
            else:
                change[name] += (logits - own).abs().mean().item() * len(x)
            pred = torch.sigmoid(logits) > 0.5
            tgt = y > 0.5
            sums[name][0] += (pred & tgt).sum().item()
            sums[name][1] += pred.sum().item() + tgt.sum().item()
            sums[name][2] += per_image_dice(logits, y, 0.5).sum().item()
        count += len(x)
    out = {name: {"dice": 2 * s[0] / s[1], "per_image_dice": s[2] / count} for name, s in sums.items()}
    out["mean_abs_logit_change"] = {k: v / count for k, v in change.items()}
    out["gates"] = [[round(float(w), 4) for w in rcu.weights] for rcu in model.rcus] if model.rcus is not None else None
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    dev = sys.argv[1]
    for ckpt in sys.argv[2:]:
        print(ckpt, effect(ckpt, dev), flush=True)
