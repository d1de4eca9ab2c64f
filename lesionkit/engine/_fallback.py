"""Private stand-ins used only while lesionkit.data / metrics / losses are absent from the tree.

Removed once those packages land; nothing outside lesionkit.engine imports this module.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F


class SyntheticLesions(torch.utils.data.Dataset):
    """Bright background, darker irregular blob; deterministic per (seed, index)."""

    def __init__(self, n: int, image_size: int = 256, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, image_size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s = self.size
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
        cx, cy = (torch.rand(2, generator=g) - 0.5) * 0.8
        r = 0.2 + 0.4 * torch.rand(1, generator=g)
        ang = torch.atan2(yy - cy, xx - cx)
        wobble = 1 + 0.2 * torch.sin(3 * ang + 6.28 * torch.rand(1, generator=g))
        mask = (((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() < r * wobble).float()[None]
        skin = torch.tensor([0.85, 0.65, 0.55]) + 0.05 * torch.randn(3, generator=g)
        lesion = torch.tensor([0.45, 0.3, 0.25]) + 0.05 * torch.randn(3, generator=g)
        image = skin[:, None, None] * (1 - mask) + lesion[:, None, None] * mask
        image = (image + 0.05 * torch.randn(3, s, s, generator=g)).clamp(0, 1)
        return {"image": image, "mask": mask, "id": f"synthetic_{self.seed}_{i:05d}", "orig_size": (s, s)}


def from_spec(spec: str, image_size=None):
    kind, _, rest = spec.partition(":")
    if kind != "synthetic":
        raise ValueError(f"data spec {spec!r}: only 'synthetic:N[:seed]' is available until lesionkit.data lands")
    n, _, seed = rest.partition(":")
    return SyntheticLesions(int(n), image_size or 256, int(seed or 0))


class SegmentationMetrics:
    def __init__(self, threshold: float = 0.5, from_logits: bool = False) -> None:
        self.threshold, self.from_logits = threshold, from_logits
        self.tp = self.fp = self.fn = self.tn = 0
        self.per_image: list[tuple[float, float]] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        p = torch.sigmoid(pred) if self.from_logits else pred
        p = (p > self.threshold).flatten(1).float()
        t = (target > 0.5).flatten(1).float()
        tp, fp, fn = (p * t).sum(1), (p * (1 - t)).sum(1), ((1 - p) * t).sum(1)
        tn = p.shape[1] - tp - fp - fn
        self.tp += tp.sum().item(); self.fp += fp.sum().item(); self.fn += fn.sum().item(); self.tn += tn.sum().item()
        for a, b, c in zip(tp.tolist(), fp.tolist(), fn.tolist()):
            d = 1.0 if a + b + c == 0 else 2 * a / (2 * a + b + c)
            j = 1.0 if a + b + c == 0 else a / (a + b + c)
            self.per_image.append((d, j))

    def compute(self) -> dict:
        tp, fp, fn = self.tp, self.fp, self.fn
        dice = 2 * tp / max(1, 2 * tp + fp + fn)
        iou = tp / max(1, tp + fp + fn)
        n = len(self.per_image)
        pd = sum(d for d, _ in self.per_image) / max(1, n)
        pj = sum(j for _, j in self.per_image) / max(1, n)
        isic = sum(j if j >= 0.65 else 0.0 for _, j in self.per_image) / max(1, n)
        return {"dataset": {"dice": dice, "iou": iou}, "per_image": {"dice": pd, "iou": pj}, "isic_jaccard": isic, "n_images": n}


class BCEDiceLoss(nn.Module):
    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target)
        p = torch.sigmoid(logits).flatten(1)
        t = target.flatten(1)
        dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
        return self.bce_weight * bce + self.dice_weight * dice.mean()


