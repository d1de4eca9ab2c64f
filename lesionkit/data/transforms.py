"""Paired image / mask transforms over torchvision.transforms.v2 (the mask is a tv_tensors.Mask,
so geometry is shared and resampled with nearest neighbour, and colour changes skip it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from lesionkit.data.sizes import as_hw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GrayWorld(v2.Transform):
    """Gray-world colour constancy (SegMAE; ISIC 2017 entries): scale each channel so its mean
    equals the mean over all channels. Images only; masks pass through."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def transform(self, inpt, params):
        x = inpt.as_subclass(torch.Tensor)
        means = x.mean(dim=(-2, -1), keepdim=True)
        gray = means.mean(dim=-3, keepdim=True)
        out = (x * (gray / means.clamp_min(self.eps))).clamp(0, 1)
        return tv_tensors.wrap(out, like=inpt)

    # torchvision < 0.21 calls _transform.
    _transform = transform


class PairedTransform:
    """Apply a v2 transform to an item dict's image and mask together; other keys are kept."""

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __call__(self, item: dict) -> dict:
        sample = {"image": tv_tensors.Image(item["image"]), "mask": tv_tensors.Mask(item["mask"])}
        out = self.transform(sample)
        new = dict(item)
        new["image"] = out["image"].as_subclass(torch.Tensor)
        new["mask"] = out["mask"].as_subclass(torch.Tensor)
        return new

    def __repr__(self) -> str:
        return f"PairedTransform({self.transform!r})"


def train_transforms(image_size=None, hflip: float = 0.5, vflip: float = 0.5,
                     rotation: float = 0.0, brightness: float = 0.0, contrast: float = 0.0,
                     gray_world: bool = False, normalize: tuple[Sequence[float], Sequence[float]] | None = None
                     ) -> PairedTransform:
    """Training augmentation: resize, flips, rotation (degrees), brightness / contrast jitter,
    optional gray-world and mean/std normalisation (e.g. (IMAGENET_MEAN, IMAGENET_STD))."""
    ts: list = []
    if gray_world:
        ts.append(GrayWorld())
    if image_size is not None:
        ts.append(v2.Resize(as_hw(image_size), antialias=True))
    if hflip:
        ts.append(v2.RandomHorizontalFlip(hflip))
    if vflip:
        ts.append(v2.RandomVerticalFlip(vflip))
    if rotation:
        ts.append(v2.RandomRotation(rotation))
    if brightness or contrast:
        ts.append(v2.ColorJitter(brightness=brightness, contrast=contrast))
    if normalize is not None:
        ts.append(v2.Normalize(*normalize))
    return PairedTransform(v2.Compose(ts))


def eval_transforms(image_size=None, gray_world: bool = False,
                    normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> PairedTransform:
    """Deterministic evaluation transform: optional gray-world, resize and normalisation."""
    return train_transforms(image_size, hflip=0.0, vflip=0.0, gray_world=gray_world, normalize=normalize)
