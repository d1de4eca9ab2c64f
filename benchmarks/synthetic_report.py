"""Speed and difficulty of SyntheticLesions, and the sample grid in docs/.

    python benchmarks/synthetic_report.py [--n 200] [--grid docs/synthetic_samples.jpg]

Prints images/s (single process, one thread, as in a DataLoader worker) and the Dice of
Otsu's threshold and of the best single threshold chosen with the ground truth ("oracle"),
on the synthetic data and, when ../shared/data/isic2018-dev is present, on real ISIC images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lesionkit.data import ISICDataset, SyntheticLesions

REAL_ISIC = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2018-dev"
LUMA = torch.tensor([0.299, 0.587, 0.114])[:, None, None]


def otsu(gray: np.ndarray) -> float:
    hist, edges = np.histogram(gray, 256, (0.0, 1.0))
    p = hist / hist.sum()
    c = (edges[:-1] + edges[1:]) / 2
    w0, mu = np.cumsum(p), np.cumsum(p * c)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    return float(c[np.nanargmax(between)])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def threshold_scores(ds, n: int) -> dict:
    o, best = [], []
    for i in range(min(n, len(ds))):
        item = ds[i]
        gray = (item["image"] * LUMA).sum(0).numpy()
        gt = item["mask"][0].numpy() > 0.5
        o.append(dice(gray < otsu(gray), gt))
        best.append(max(dice(gray < t, gt) for t in np.linspace(0.02, 0.98, 49)))
    return {"otsu_dice": float(np.mean(o)), "oracle_threshold_dice": float(np.mean(best)), "n": len(o)}


def throughput(size: int, n: int) -> dict:
    """Best of 3 runs of n images: wall-clock and process-CPU-time rates (the second is what an
    unshared core gives; the first drops when other processes compete for the cores)."""
    ds = SyntheticLesions(10 * n, image_size=size, seed=0)
    ds[0]
    wall = cpu = 0.0
    for r in range(3):
        t, c = time.perf_counter(), time.process_time()
        for i in range(r * n, (r + 1) * n):
            ds[i]
        wall = max(wall, n / (time.perf_counter() - t))
        cpu = max(cpu, n / (time.process_time() - c))
    return {"wall": wall, "cpu_time": cpu}


def grid(path: Path, seed: int = 0, rows: int = 3, cols: int = 6, size: int = 192) -> None:
    ds = SyntheticLesions(rows * cols, image_size=size, seed=seed)
    tiles = []
    for i in range(rows * cols):
        item = ds[i]
        img, m = item["image"].clone(), item["mask"]
        edge = (torch.nn.functional.max_pool2d(m[None], 3, 1, 1)[0] - m)[0] > 0
        img[:, edge] = torch.tensor([0.1, 1.0, 0.2])[:, None]  # mask outline in green
        tiles.append(torch.nn.functional.pad(img, (2, 2, 2, 2), value=1.0))
    g = torch.cat([torch.cat(tiles[r * cols:(r + 1) * cols], 2) for r in range(rows)], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((g.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(path, quality=88)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--grid", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"images_per_s": {s: throughput(s, args.n) for s in (128, 256)},
           "synthetic_256": threshold_scores(SyntheticLesions(args.n, 256, seed=0), args.n)}
    if REAL_ISIC.is_dir():
        out["isic2018_dev_val"] = threshold_scores(ISICDataset(REAL_ISIC, split="val"), args.n)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.grid:
        grid(args.grid)


if __name__ == "__main__":
    main()
