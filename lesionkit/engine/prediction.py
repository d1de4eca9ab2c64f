"""Masks for new images of any size, written at the image's original resolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.nn import functional as F

from lesionkit.engine.evaluation import autocast_context
from lesionkit.engine.overlays import overlay
from lesionkit.models import segmentation_logits

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Image files named directly or found (non-recursively) in named folders; sorted per folder."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.lower().endswith(("_segmentation", "_superpixels", "_mask")))
            if not found:
                raise ValueError(f"folder {str(path)!r} holds no images with suffixes {IMAGE_SUFFIXES}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist")
    return files


def load_image(path: Path, min_side: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(image (3, h, w) float in [0, 1], original (H, W))``.

    With ``min_side``, JPEGs decode at a reduced DCT scale that still covers it, so a
    6000x4000 image does not pay for a full-size decode before being shrunk to 128 px.
    """
    try:
        with Image.open(path) as img:
            orig = (img.height, img.width)
            if min_side is not None and img.format == "JPEG":
                img.draft("RGB", (min_side, min_side))
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0, orig


@dataclass
class Prediction:
    path: Path
    mask_path: Path
    overlay_path: Path
    orig_size: tuple[int, int]
    foreground_fraction: float


@torch.no_grad()
def predict_files(model: nn.Module, files: list[Path], out_dir: Path, image_size: int, device: torch.device,
                  threshold: float = 0.5, precision: str = "fp32", overlay_max_side: int = 1024,
                  transform=None) -> list[Prediction]:
    """Writes ``<stem>_mask.png`` (0/255, original size) and ``<stem>_overlay.png`` per input.

    ``transform`` is the evaluation transform of the training config (an item-dict callable).
    """
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    stems: dict[str, int] = {}
    results = []
    for path in files:
        image, (h, w) = load_image(path, min_side=image_size)
        x = F.interpolate(image[None], size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        if transform is not None:
            x = transform({"image": x[0], "mask": torch.zeros(1, image_size, image_size)})["image"][None]
        with autocast_context(device, precision):
            logits = segmentation_logits(model(x.to(device)))
        # Upsample logits, not the thresholded mask, so the boundary is smooth at full size.
        logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        mask = (torch.sigmoid(logits[0, 0]) > threshold).cpu()
        stem = path.stem
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:  # same file name from two folders
            stem = f"{stem}_{stems[stem]}"
        mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
        Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(mask_path)
        full, _ = load_image(path, min_side=overlay_max_side)  # reduced-scale decode is enough for a picture
        scale = min(1.0, overlay_max_side / max(h, w))
        if scale < 1.0:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            full = F.interpolate(full[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            small = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
        else:
            small = mask
            if tuple(full.shape[-2:]) != (h, w):
                full = F.interpolate(full[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        overlay(full, small).save(overlay_path)
        results.append(Prediction(path, mask_path, overlay_path, (h, w), float(mask.float().mean())))
    return results
