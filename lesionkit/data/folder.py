"""The ``{train,val,test}/{images,masks}/`` layout (VM-UNet and most public code)."""

from __future__ import annotations

from pathlib import Path

from lesionkit.data.image_io import list_images
from lesionkit.data.paired import PairedImageDataset, missing_masks_error

MASK_SUFFIXES = ("", "_segmentation", "_mask", "_lesion")  # tried after the image's stem


class FolderDataset(PairedImageDataset):
    """Images in ``root/split/images``, masks with the same stem (any image extension, optionally
    ending in one of MASK_SUFFIXES) in ``root/split/masks``. split None reads ``root/images``."""

    def __init__(self, root, split: str | None = None, image_size=None, transform=None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"folder dataset root {root} is not a folder")
        base = root if split is None else root / split
        img_dir, mask_dir = base / "images", base / "masks"
        if not img_dir.is_dir() or not mask_dir.is_dir():
            splits = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
            hint = f"; splits found: {splits}" if splits else ""
            raise ValueError(f"no folder layout at {base}: expected {img_dir} and {mask_dir} "
                             f"(layout {{train,val,test}}/{{images,masks}}/){hint}")
        masks = {p.stem.lower(): p for p in list_images(mask_dir)}
        samples, missing = [], []
        for p in list_images(img_dir):
            mask = next((masks[k] for k in (p.stem.lower() + s for s in MASK_SUFFIXES) if k in masks), None)
            if mask is None:
                missing.append(p)
            else:
                samples.append((p.stem, p, mask))
        if missing:
            raise missing_masks_error("folder dataset", base, missing)
        if not samples:
            raise ValueError(f"folder dataset {img_dir} holds no images")
        self.root, self.split = root, split
        super().__init__(samples, image_size, transform)
