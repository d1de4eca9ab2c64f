"""Is SyntheticLesions learnable? Train a small U-Net briefly and compare with Otsu's threshold.

    python benchmarks/synthetic_learnability.py [--steps 600] [--size 96] [--minutes 8]

Trains lesionkit's ``unet_tiny`` with BCE + Dice on seed-0 images and scores seed-1 images
(never seen) with SegmentationMetrics; prints the model's Dice next to Otsu's on the same images.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import lesionkit
from lesionkit.data import SyntheticLesions
from lesionkit.losses import BCEDiceLoss
from lesionkit.metrics import SegmentationMetrics

from synthetic_report import LUMA, dice, otsu


def stack(ds):
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--train", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=8.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = stack(SyntheticLesions(args.train, args.size, seed=0))
    xt, yt = stack(SyntheticLesions(128, args.size, seed=1))
    model = lesionkit.create_model("unet_tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps)
    loss_fn = BCEDiceLoss()
    start, step = time.time(), 0
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch,))
        xb, yb = x[idx], y[idx]
        if torch.rand(()) < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
        if time.time() - start > 60 * args.minutes:
            break
    model.eval()
    m = SegmentationMetrics(from_logits=True)
    with torch.no_grad():
        for i in range(0, len(xt), 32):
            m.update(model(xt[i:i + 32]), yt[i:i + 32])
    res = m.compute()
    o = [dice((xt[i] * LUMA).sum(0).numpy() < otsu((xt[i] * LUMA).sum(0).numpy()), yt[i, 0].numpy() > 0.5)
         for i in range(len(xt))]
    print(json.dumps({"steps": step, "seconds": round(time.time() - start), "size": args.size,
                      "unet_tiny_dice_per_image": res["per_image"]["dice"],
                      "unet_tiny_dice_dataset": res["dataset"]["dice"],
                      "unet_tiny_hd95_per_image": res["per_image"]["hd95"],
                      "otsu_dice_per_image": float(np.mean(o))}, indent=2))


if __name__ == "__main__":
    main()
