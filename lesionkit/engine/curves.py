"""Loss and metric curves drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, series: dict[str, list[tuple[float, float]]]) -> None:
    x0, y0, x1, y1 = box
    draw.text((x0 + 40, y0 + 4), title, fill=(0, 0, 0))
    px0, py0, px1, py1 = x0 + 50, y0 + 24, x1 - 10, y1 - 30
    draw.rectangle((px0, py0, px1, py1), outline=(0, 0, 0))
    points = [p for pts in series.values() for p in pts if math.isfinite(p[1])]
    if not points:
        draw.text((px0 + 10, py0 + 10), "no data", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = min(ys), max(ys)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax - ymin < 1e-9:
        ymin, ymax = ymin - 0.5, ymax + 0.5
    pad = 0.05 * (ymax - ymin)
    ymin, ymax = ymin - pad, ymax + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return px0 + (x - xmin) / (xmax - xmin) * (px1 - px0), py1 - (y - ymin) / (ymax - ymin) * (py1 - py0)

    for k in range(5):  # y ticks
        y = ymin + k * (ymax - ymin) / 4
        _, py = to_px(xmin, y)
        draw.line((px0 - 4, py, px0, py), fill=(0, 0, 0))
        draw.text((x0 + 2, py - 6), f"{y:.3g}", fill=(0, 0, 0))
    draw.text((px0, py1 + 6), f"{xmin:g}", fill=(0, 0, 0))
    draw.text((px1 - 30, py1 + 6), f"{xmax:g}", fill=(0, 0, 0))
    draw.text(((px0 + px1) / 2 - 15, py1 + 14), "epoch", fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = [to_px(x, y) for x, y in pts if math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((px1 - 150, py0 + 6 + 14 * i), name, fill=colour)


def plot_curves(rows: list[dict], path: str | Path) -> None:
    """Two panels from log rows: train losses and validation metrics against epoch."""
    def series(prefix: str) -> dict[str, list[tuple[float, float]]]:
        keys = [k for k in (rows[0] if rows else {}) if k.startswith(prefix)]
        out = {}
        for key in keys:
            pts = []
            for row in rows:
                try:
                    pts.append((float(row["epoch"]), float(row[key])))
                except (TypeError, ValueError, KeyError):
                    continue
            if pts:
                out[key] = pts
        return out

    img = Image.new("RGB", (960, 360), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    _panel(draw, (0, 0, 480, 360), "training loss", series("train_"))
    _panel(draw, (480, 0, 960, 360), "validation", {k: v for k, v in series("val_").items() if k in ("val_dice", "val_iou", "val_per_image_dice", "val_isic_jaccard")})
    img.save(path)
