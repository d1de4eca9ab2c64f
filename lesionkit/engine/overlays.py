"""Overlay pictures: prediction (red) and ground truth (green) contours over the image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F


def _boundary(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels of ``mask`` (H, W) bool within ``width`` of its edge."""
    m = mask[None, None].float()
    eroded = -F.max_pool2d(-m, 2 * width + 1, stride=1, padding=width)
    return (m - eroded)[0, 0] > 0


def overlay(image: torch.Tensor, pred: torch.Tensor | None, target: torch.Tensor | None = None) -> Image.Image:
    """``image`` (3, H, W) in [0, 1]; ``pred`` / ``target`` (H, W) or (1, H, W) bool-like masks."""
    img = image.detach().float().cpu().clamp(0, 1).clone()
    width = max(1, round(max(img.shape[-2:]) / 256))
    if pred is not None:
        p = pred.detach().cpu().reshape(img.shape[-2:]) > 0.5
        img = torch.where(p, 0.7 * img + 0.3 * torch.tensor([1.0, 0.0, 0.0])[:, None, None], img)
        img[:, _boundary(p, width)] = torch.tensor([1.0, 0.1, 0.1])[:, None]
    if target is not None:
        t = target.detach().cpu().reshape(img.shape[-2:]) > 0.5
        img[:, _boundary(t, width)] = torch.tensor([0.1, 1.0, 0.1])[:, None]
    return Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def grid(tiles: list[tuple[Image.Image, str]], columns: int = 4, tile_size: int = 192) -> Image.Image:
    """Tiles resized to ``tile_size`` with a caption line under each."""
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    caption_h = 16
    out = Image.new("RGB", (columns * tile_size, rows * (tile_size + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, (tile, caption) in enumerate(tiles):
        x, y = (i % columns) * tile_size, (i // columns) * (tile_size + caption_h)
        out.paste(tile.resize((tile_size, tile_size), Image.Resampling.BILINEAR), (x, y))
        draw.text((x + 3, y + tile_size + 2), caption[:32], fill=(0, 0, 0))
    return out
