"""A picture of GRCSF's inputs and outputs on a few validation images (docs/grcsf.md).

    python benchmarks/grcsf_figure.py --checkpoint runs/grcsf_tiny_isic2018/best.pt \
        --data isic:PATH/TO/isic2018:val [--baseline runs/unetpp_tiny_isic2018/best.pt] \
        [--n 4] [--out docs/grcsf_isic2018_val.jpg]

One row per image: the image, its residual maps at each mask ratio (made by the MAE inside the
GRCSF checkpoint, as `lesionkit evaluate` makes them), the ground truth, the GRCSF prediction
and, with --baseline, another checkpoint's prediction. The images are the first --n of the
validation set whose ids sort first after hashing, a fixed pick that does not favour either model.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lesionkit.data import from_spec
from lesionkit.engine import load_checkpoint, model_from_checkpoint
from lesionkit.engine.trainers.residual_maps import residual_maps
from lesionkit.models import segmentation_logits


def to_rgb(t: torch.Tensor) -> np.ndarray:
    a = t.detach().float().clamp(0, 1).cpu().numpy()
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    return (a.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def heat(t: torch.Tensor) -> np.ndarray:
    """A residual map, each scaled to its own 99th percentile, as a black-red-yellow image."""
    v = t.detach().float().cpu()
    v = (v / v.flatten().quantile(0.99).clamp_min(1e-6)).clamp(0, 1).numpy()
    rgb = np.stack([np.clip(2 * v, 0, 1), np.clip(2 * v - 1, 0, 1), np.zeros_like(v)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--baseline")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", default="docs/grcsf_isic2018_val.jpg")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state, args.checkpoint).eval()
    size = int(state["config"]["data"]["image_size"])
    baseline = None
    if args.baseline:
        baseline = model_from_checkpoint(load_checkpoint(args.baseline), args.baseline).eval()
    dataset = from_spec(args.data, image_size=size)
    ids = list(dataset.ids) if hasattr(dataset, "ids") else [str(i) for i in range(len(dataset))]
    order = sorted(range(len(dataset)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())[: args.n]
    ratios = model.residual_settings.ratios
    titles = ["image", *(f"RM r={r:g}" for r in ratios), "ground truth", "GRCSF"] + (["UNet++"] if baseline else [])
    rows = []
    for i in order:
        item = dataset[i]
        image = item["image"][None]
        maps = residual_maps(model.mae, image, model.residual_settings)[0]
        pred = torch.sigmoid(segmentation_logits(model(image, residual_maps=maps[None])))[0] > 0.5
        tiles = [to_rgb(item["image"]), *(heat(m) for m in maps), to_rgb(item["mask"]), to_rgb(pred.float())]
        if baseline is not None:
            tiles.append(to_rgb((torch.sigmoid(segmentation_logits(baseline(image)))[0] > 0.5).float()))
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    header = Image.new("RGB", (grid.shape[1], 16), "white")
    draw = ImageDraw.Draw(header)
    for k, title in enumerate(titles):
        draw.text((k * size + 3, 2), title, fill="black")
    out = Image.new("RGB", (grid.shape[1], grid.shape[0] + 16), "white")
    out.paste(header, (0, 0))
    out.paste(Image.fromarray(grid), (0, 16))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out, quality=85)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KB): {', '.join(ids[i] for i in order)}")


if __name__ == "__main__":
    main()
