"""Masks for new images of any size, written at the image's original resolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from lesionkit.data.image_io import IMAGE_EXTENSIONS, load_image
from lesionkit.engine.evaluation import autocast_context
from lesionkit.engine.overlays import overlay
from lesionkit.models import segmentation_logits


# Files of a folder that are not inputs: ISIC's ground truth and superpixels, and predict's own
# outputs (a second run on an output folder predicts nothing twice).
SKIPPED_STEMS = ("_segmentation", "_superpixels", "_mask", "_overlay")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Image files named directly or found (non-recursively) in named folders; sorted per folder."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.stem.lower().endswith(SKIPPED_STEMS))
            if not found:
                raise ValueError(f"folder {str(path)!r} holds no images with suffixes {IMAGE_EXTENSIONS}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist")
    return files


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
        # Read as the datasets read it (any mode, EXIF orientation applied), so the model sees what
        # evaluation shows it; the mask is written on that displayed view, as masks are read.
        x, (h, w) = load_image(path, (image_size, image_size))
        if transform is not None:
            x = transform({"image": x, "mask": torch.zeros(1, image_size, image_size)})["image"]
        with autocast_context(device, precision):
            logits = segmentation_logits(model(x[None].to(device)))
        # Upsample logits, not the thresholded mask, so the boundary is smooth at full size.
        logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        mask = (torch.sigmoid(logits[0, 0]) > threshold).cpu()
        stem = path.stem
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:  # same file name from two folders
            stem = f"{stem}_{stems[stem]}"
        mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
        Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(mask_path)
        scale = min(1.0, overlay_max_side / max(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        full, _ = load_image(path, size if scale < 1.0 else None)  # reduced-scale decode is enough for a picture
        small = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] if scale < 1.0 else mask
        overlay(full, small).save(overlay_path)
        results.append(Prediction(path, mask_path, overlay_path, (h, w), float(mask.float().mean())))
    return results
