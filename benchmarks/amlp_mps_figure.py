"""docs/amlp_mps_epochs.jpg: the patches MPS masks on a few images as AMR raises the ratio.

    python benchmarks/amlp_mps_figure.py isic:PATH/isic2018-dev:val docs/amlp_mps_epochs.jpg

The recipe amlp_pretrain_tiny_isic2018: 128 px, 8-px patches (256 per image), k-means on the
patches' pixels, hard_to_easy, sigma from 25 % at epoch 1 to the 75 % cap at epoch 4 (Eq. 9).
With pixel features the selection depends on the image and the ratio only, so the figure needs
no trained model. Masked patches are shaded red; the green line is the ground-truth lesion
outline (never seen by MPS).
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lesionkit.data import from_spec  # noqa: E402
from lesionkit.layers.masked_patch_selection import amr_mask_ratio, amr_tau, select_masked_patches  # noqa: E402
from lesionkit.layers.patch_masking import patch_mask_to_pixels, patchify  # noqa: E402

EPOCHS, SIZE, PATCH = 4, 128, 8


def main(spec: str, out: str, picks=(0, 40, 80, 120, 160)) -> None:
    data = from_spec(spec, image_size=SIZE)
    items = [data[i] for i in picks if i < len(data)]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    tau = amr_tau(0.25, 0.75, EPOCHS)
    grid = (SIZE // PATCH, SIZE // PATCH)
    fig, axes = plt.subplots(len(items), EPOCHS + 1, figsize=(1.9 * (EPOCHS + 1), 1.9 * len(items)))
    for col in range(EPOCHS + 1):
        if col == 0:
            shown, title = None, "image + lesion"
        else:
            ratio = amr_mask_ratio(col, 0.25, tau, 0.75)
            sel = select_masked_patches(patchify(images, PATCH, layout="cpq"), ratio, "hard_to_easy")
            shown = patch_mask_to_pixels(sel.mask, PATCH, grid)[:, 0].numpy()
            title = f"epoch {col}: sigma {ratio:.2f}"
        for row in range(len(items)):
            ax = axes[row, col]
            img = images[row].permute(1, 2, 0).numpy().copy()
            if shown is not None:
                m = shown[row]
                img[m] = 0.45 * img[m] + 0.55 * np.array([0.9, 0.1, 0.1])
            ax.imshow(img)
            ax.contour(masks[row, 0].numpy(), levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80, pil_kwargs={"quality": 80})
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
