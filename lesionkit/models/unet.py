"""U-Net (Ronneberger et al. 2015): the baseline of the four papers and AMLP's backbone.

The paper-size default (widths 64..1024, transposed-convolution upsampling, batch norm) is the
31.04M-parameter U-Net of GRCSF's comparison table. ``unet_tiny`` is a narrow, shallower variant
for 128-px input that trains on a laptop CPU in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.models.registry import build_config, register_model

_NORMS = {
    "batchnorm": nn.BatchNorm2d,
    "instancenorm": lambda c: nn.InstanceNorm2d(c, affine=True),
    "groupnorm": lambda c: nn.GroupNorm(min(8, c), c),
    "none": lambda c: nn.Identity(),
}
_ACTS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "silu": lambda: nn.SiLU(inplace=True)}
_UPSAMPLES = ("transpose", "bilinear")


@dataclass
class UNetConfig:
    in_chans: int = 3
    num_classes: int = 1
    # Channels per level, encoder top to bottleneck; len(widths) - 1 poolings.
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    norm: str = "batchnorm"
    act: str = "relu"
    # "transpose" = 2x2 transposed conv (the original paper); "bilinear" halves the channels
    # with a 1x1 conv after upsampling (fewer parameters).
    upsample: str = "transpose"
    dropout: float = 0.0  # before the bottleneck's second conv; our choice, 0 = off
    # Input standardisation (x - mean) / std per channel, the first step of forward, so that
    # evaluation, prediction and export repeat it; None feeds the images as loaded ([0, 1]).
    # A training recipe may say "dataset": the trainer replaces it with the training images'
    # statistics (or those its init_from checkpoint recorded) before the model is built, and
    # checkpoints record the numbers (docs/amlp.md).
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.widths) < 2 or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"widths should list >= 2 positive channel counts, got {self.widths}")
        for name, value, valid in (("norm", self.norm, _NORMS), ("act", self.act, _ACTS), ("upsample", self.upsample, _UPSAMPLES)):
            if value not in valid:
                raise ValueError(f"{name} should be one of {sorted(valid)}, got {value!r}")
        if self.in_chans < 1 or self.num_classes < 1:
            raise ValueError(f"in_chans and num_classes should be >= 1, got {self.in_chans} and {self.num_classes}")
        check_input_statistics(self.input_mean, self.input_std, self.in_chans)


def check_input_statistics(mean, std, channels: int) -> None:
    """input_mean / input_std: both None, or ``channels`` numbers each with every std > 0."""
    if mean is None and std is None:
        return
    if "dataset" in (mean, std):
        raise ValueError("input_mean / input_std 'dataset' is resolved by the trainer from the training images; "
                         "a model built directly needs the numbers (or None)")
    for name, value in (("input_mean", mean), ("input_std", std)):
        if value is None or isinstance(value, str) or len(value) != channels:
            raise ValueError(f"{name} should list in_chans={channels} numbers (with the other given too), got {value!r}")
    if not all(float(s) > 0 for s in std):
        raise ValueError(f"input_std should be > 0 in every channel, got {std!r}")


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> act) twice; the conv has no bias when a norm follows it."""

    def __init__(self, cin: int, cout: int, norm: str, act: str, dropout: float = 0.0) -> None:
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=bias), _NORMS[norm](cout), _ACTS[act]()]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += [nn.Conv2d(cout, cout, 3, padding=1, bias=bias), _NORMS[norm](cout), _ACTS[act]()]
        super().__init__(*layers)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.upsample == "transpose":
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(cin, cin // 2, 1))
        self.conv = DoubleConv(cin // 2 + cskip, cout, cfg.norm, cfg.act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Encoder-decoder with skip connections; returns logits (B, num_classes, H, W)."""

    # State-dict prefixes of each part, for loading pre-trained parts (`init_from`, `init_parts`).
    init_parts = {"encoder": ("stem.", "down."), "decoder": ("up.",), "head": ("head.",)}

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = [int(c) for c in cfg.widths]
        self.stem = DoubleConv(cfg.in_chans, w[0], cfg.norm, cfg.act)
        self.down = nn.ModuleList(
            DoubleConv(w[i - 1], w[i], cfg.norm, cfg.act, cfg.dropout if i == len(w) - 1 else 0.0) for i in range(1, len(w))
        )
        self.up = nn.ModuleList(UpBlock(w[i], w[i - 1], w[i - 1], cfg) for i in range(len(w) - 1, 0, -1))
        self.head = nn.Conv2d(w[0], cfg.num_classes, 1)
        self.reduction = 2 ** (len(w) - 1)
        # Not in the state dict: the numbers travel in the model options (checkpoint model_kwargs).
        standardise = cfg.input_mean is not None
        mean = torch.tensor(cfg.input_mean if standardise else (0.0,) * cfg.in_chans, dtype=torch.float32)
        std = torch.tensor(cfg.input_std if standardise else (1.0,) * cfg.in_chans, dtype=torch.float32)
        self.register_buffer("input_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", std.view(1, -1, 1, 1), persistent=False)

    @property
    def standardises(self) -> bool:
        return self.cfg.input_mean is not None

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - input_mean) / input_std per channel; x itself when the model has no statistics."""
        if not self.standardises:
            return x
        return (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"x should be (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.reduction or w % self.reduction:
            raise ValueError(f"input height and width should be multiples of {self.reduction} for this U-Net, got {h}x{w}")
        skips = [self.stem(self.standardize(x))]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for block in self.up:
            y = block(y, skips.pop())
        return self.head(y)


def _unet(name: str, defaults: dict, kwargs: dict) -> UNet:
    return UNet(build_config(UNetConfig, defaults, kwargs, name))


@register_model
def unet(**kwargs) -> UNet:
    """Classic U-Net, paper size (31.04M parameters at 1 class)."""
    return _unet("unet", {}, kwargs)


@register_model
def unet_tiny(**kwargs) -> UNet:
    """Narrow 5-level U-Net (1.94M parameters) for 128-px input; the demo model."""
    # Five levels: at 128 px the bottleneck sees the whole image, which large lesions need.
    return _unet("unet_tiny", {"widths": (16, 32, 64, 128, 256)}, kwargs)


__all__ = ["UNet", "UNetConfig", "unet", "unet_tiny"]
