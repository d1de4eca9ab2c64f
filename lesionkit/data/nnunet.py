"""Export any lesionkit dataset to the nnU-Net v2 raw layout (2D natural images)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image


def to_nnunet(dataset, out_dir, dataset_id: int, name: str = "Lesion", overwrite: bool = False) -> Path:
    """Write ``Dataset{ID:03d}_{name}/{imagesTr,labelsTr}/`` and ``dataset.json``.

    Images become RGB PNGs ``CASE_0000.png`` (channels R, G, B), labels ``CASE.png`` with 0/1.
    Items must hold images in [0, 1] (no mean/std normalisation). Returns the dataset folder.
    """
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id should be an int in [1, 999], got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"name should hold letters, digits, '_' or '-' only, got {name!r}")
    folder = Path(out_dir) / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"{folder} exists and is not empty; pass overwrite=True to write into it")
    images, labels = folder / "imagesTr", folder / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for i in range(len(dataset)):
        item = dataset[i]
        case = re.sub(r"[^A-Za-z0-9_-]", "_", str(item["id"]))
        if case in seen:
            raise ValueError(f"item {i}: case id {case!r} (from {item['id']!r}) is not unique")
        seen.add(case)
        img = item["image"]
        if float(img.min()) < 0 or float(img.max()) > 1:
            raise ValueError(f"item {item['id']!r}: image values should be in [0, 1] for export, got "
                             f"[{float(img.min()):.3g}, {float(img.max()):.3g}] (drop the normalisation)")
        rgb = (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(images / f"{case}_0000.png")
        lab = (item["mask"][0].numpy() > 0.5).astype(np.uint8)
        Image.fromarray(lab, "L").save(labels / f"{case}.png")
    meta = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(seen),
        "file_ending": ".png",
        "name": name,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder
