"""Training augmentation: one set of options (the engine's ``data.transforms``) applied in two places.

- Per image, in the data loader: :func:`train_transforms` / :func:`eval_transforms`, paired
  image / mask transforms over torchvision.transforms.v2 (the mask is a tv_tensors.Mask, so
  geometry is shared and resampled with nearest neighbour, and colour changes skip it).
- Per batch, on the training device: :class:`BatchFlips`, the random flips and 90-degree turns,
  which cost nothing there and need no resampling.

:func:`split_transform_options` says which option goes where.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from lesionkit.data.sizes import as_hw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Options of data.transforms applied per batch by BatchFlips (probabilities) and their defaults:
# flips are on unless switched off (our choice: cheap and label-preserving for lesions).
BATCH_FLIPS = {"hflip": 0.5, "vflip": 0.5, "rot90": 0.0}
# Options applied per image by train_transforms; normalisation is the model's business.
IMAGE_TRANSFORMS = ("rotation", "brightness", "contrast", "gray_world")
TRANSFORM_OPTIONS = tuple(BATCH_FLIPS) + IMAGE_TRANSFORMS


def split_transform_options(options: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """``data.transforms`` as (BatchFlips probabilities with defaults filled in, train_transforms kwargs)."""
    unknown = sorted(set(options) - set(TRANSFORM_OPTIONS))
    if unknown:
        raise ValueError(f"data.transforms has unknown key(s) {unknown}; valid: {list(TRANSFORM_OPTIONS)}")
    flips = {k: float(options.get(k, default)) for k, default in BATCH_FLIPS.items()}
    for k, v in flips.items():
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"data.transforms.{k} is a probability and should be in [0, 1], got {v}")
    return flips, {k: v for k, v in options.items() if k in IMAGE_TRANSFORMS}


class BatchFlips:
    """Random horizontal / vertical flips and transposes (90-degree turns of square images), drawn
    per sample, applied to a batch ``{"image": (B, C, H, W), "mask": (B, 1, H, W), ...}`` on its device.

    Draws come from torch's global generator (one ``torch.rand(B)`` per enabled flip), so the
    trainer's saved random state reproduces them on resume.
    """

    def __init__(self, hflip: float = 0.5, vflip: float = 0.5, rot90: float = 0.0,
                 extra_keys: tuple[str, ...] = ()) -> None:
        self.probabilities = {"hflip": hflip, "vflip": vflip, "rot90": rot90}
        # Other (B, C, H, W) entries that must move with the image (GRCSF's residual maps).
        self.extra_keys = tuple(extra_keys)

    def __bool__(self) -> bool:
        return any(self.probabilities.values())

    def __call__(self, batch: dict) -> dict:
        keys = ("image", "mask", *(k for k in self.extra_keys if k in batch))
        out = {k: batch[k] for k in keys}
        image = out["image"]
        n = image.shape[0]
        for name, dims in (("hflip", (-1,)), ("vflip", (-2,))):
            p = self.probabilities[name]
            if p:
                m = (torch.rand(n) < p).to(image.device).view(n, 1, 1, 1)
                out = {k: torch.where(m, v.flip(dims), v) for k, v in out.items()}
        p = self.probabilities["rot90"]
        if p and image.shape[-1] == image.shape[-2]:
            m = (torch.rand(n) < p).to(image.device).view(n, 1, 1, 1)
            out = {k: torch.where(m, v.transpose(-1, -2), v) for k, v in out.items()}
        return {**batch, **out}

    def __repr__(self) -> str:
        return f"BatchFlips({', '.join(f'{k}={v}' for k, v in self.probabilities.items())})"


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
