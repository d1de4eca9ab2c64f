"""GRCSF's MAE residual maps as tensors (Sec. 3.3.1, Eq. 3-5): RM_r = residual(I, mean of n MAE
reconstructions at mask ratio r), seeded per image.

The model (:class:`lesionkit.models.grcsf.GRCSF` with its frozen MAE) and the
``lesionkit residual-maps`` command (:mod:`lesionkit.engine.trainers.residual_maps`, which adds the cache,
files and the data pairing) both call :func:`residual_maps`, so they give the same maps. The
choices where the paper is silent are listed in that module's docstring and in docs/grcsf.md.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.layers.patch_masking import PatchMask, patchify, random_patch_mask, unpatchify

RESIDUAL_KINDS = ("absdiff", "mse", "ssim")
MAP_PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ResidualMapSettings:
    ratios: tuple[float, ...] = (0.5, 0.75)
    repeats: int = 5  # reconstructions averaged per ratio (Table 4: 5 is best)
    kind: str = "absdiff"  # absdiff | mse | ssim (Table 7)
    seed: int = 0
    # The MAE's forward in "fp32" or "bf16" (autocast; about 2x faster on CPUs with AVX-512 BF16 /
    # AMX, maps within about 0.01 of fp32's). Part of the cache key: the two never mix.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if not self.ratios or any(not 0.0 < r < 1.0 for r in self.ratios):
            raise ValueError(f"residual map ratios should be one or more mask ratios in (0, 1), got {list(self.ratios)}")
        if int(self.repeats) < 1:
            raise ValueError(f"residual map repeats should be >= 1, got {self.repeats}")
        if self.kind not in RESIDUAL_KINDS:
            raise ValueError(f"residual map kind should be one of {list(RESIDUAL_KINDS)}, got {self.kind!r}")
        if self.precision not in MAP_PRECISIONS:
            raise ValueError(f"residual map precision should be one of {list(MAP_PRECISIONS)}, got {self.precision!r}")

    def key(self) -> str:
        ratios = "-".join(f"{r:g}" for r in self.ratios)
        suffix = "" if self.precision == "fp32" else f"_{self.precision}"
        return f"r{ratios}_n{self.repeats}_{self.kind}_s{self.seed}{suffix}"

    def cli_flags(self) -> str:
        """The ``lesionkit residual-maps`` flags for these settings (defaults left out)."""
        default = ResidualMapSettings()
        out = []
        if self.ratios != default.ratios:
            out.append("--ratios " + " ".join(f"{r:g}" for r in self.ratios))
        if self.repeats != default.repeats:
            out.append(f"--repeats {self.repeats}")
        if self.kind != default.kind:
            out.append(f"--kind {self.kind}")
        if self.seed != default.seed:
            out.append(f"--seed {self.seed}")
        if self.precision != default.precision:
            out.append(f"--precision {self.precision}")
        return " ".join(out)


# ----------------------------------------------------------------------------- residuals


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
             data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004) of (B, C, H, W) images, per channel, same shape.

    Local means, variances and covariance over a ``window`` x ``window`` Gaussian (reflect-padded
    at the borders so the map keeps the image's size)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"x and y should be (B, C, H, W) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    c, dtype = x.shape[1], x.dtype
    # float64: E[x^2] - E[x]^2 in float32 leaves variance noise comparable to C2 on flat regions.
    x, y = x.double(), y.double()
    g = _gaussian_window(window, sigma, x.device, x.dtype)
    pad = window // 2
    if min(x.shape[-2:]) <= pad:
        raise ValueError(f"images should be larger than {pad} pixels for an {window}x{window} SSIM window, got "
                         f"{x.shape[-2]}x{x.shape[-1]}")

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (pad, pad, pad, pad), mode="reflect")
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(c, 1, 1, window), groups=c)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(c, 1, window, 1), groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim.to(dtype)


def residual(image: torch.Tensor, reconstruction: torch.Tensor, kind: str = "absdiff") -> torch.Tensor:
    """(B, C, H, W) image and reconstruction -> (B, 1, H, W) residual map, averaged over channels."""
    if image.shape != reconstruction.shape or image.ndim != 4:
        raise ValueError(f"image and reconstruction should be (B, C, H, W) of one shape, got {tuple(image.shape)} "
                         f"and {tuple(reconstruction.shape)}")
    if kind == "absdiff":  # Eq. 3
        out = (image - reconstruction).abs()
    elif kind == "mse":
        out = (image - reconstruction).square()
    elif kind == "ssim":
        out = (1 - ssim_map(image, reconstruction)) / 2
    else:
        raise ValueError(f"kind should be one of {list(RESIDUAL_KINDS)}, got {kind!r}")
    return out.mean(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- maps


def image_hash(image: torch.Tensor) -> str:
    """Hex digest of one (C, H, W) image tensor's float32 values and shape: the cache key of its maps."""
    data = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()[:32]


def _image_generator(digest: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(digest[:15], 16) + 1_000_003 * int(seed)) % (2**63 - 1))


# Images whose maskings share one MAE forward (per ratio): batch * repeats samples. Batching
# is what makes the maps fast on a CPU (one image's 5 maskings are too small a batch); each image
# still draws its masks from its own seed, so a map does not depend on the other images.
IMAGES_PER_FORWARD = 16


@torch.no_grad()
def residual_maps(mae: nn.Module, images: torch.Tensor, settings: ResidualMapSettings = ResidualMapSettings(),
                  images_per_forward: int = IMAGES_PER_FORWARD) -> torch.Tensor:
    """RM_r for each image of (B, C, H, W) ``images`` in [0, 1] and each ratio r: (B, len(ratios), H, W).

    Images whose size differs from the MAE's ``img_size`` are resized for it and the maps resized
    back (GRCSF Fig. 1). Runs in float32 whatever autocast is active, so a map is the same in
    every caller (``settings.precision="bf16"`` runs the MAE itself under bf16 autocast). The maskings of up to ``images_per_forward`` images go through the MAE
    together; each image's masks come from its own generator (its hash and the seed), so its
    maps are those it gets alone, up to float rounding."""
    cfg = mae.cfg
    if images.ndim != 4 or images.shape[1] != cfg.in_chans:
        raise ValueError(f"images should be (B, {cfg.in_chans}, H, W) for this MAE (in_chans={cfg.in_chans}), "
                         f"got {tuple(images.shape)}")
    if images_per_forward < 1:
        raise ValueError(f"images_per_forward should be >= 1, got {images_per_forward}")
    was_training = mae.training
    mae.eval()
    out = []
    try:
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            for start in range(0, images.shape[0], images_per_forward):
                out.append(_maps_of_chunk(mae, images[start:start + images_per_forward], settings))
    finally:
        mae.train(was_training)
    return torch.cat(out)


def _maps_of_chunk(mae: nn.Module, images: torch.Tensor, settings: ResidualMapSettings) -> torch.Tensor:
    size = mae.cfg.img_size
    b, c, h, w = images.shape
    x = images
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    p = mae.patch_size
    grid = (size // p, size // p)
    num = grid[0] * grid[1]
    n = settings.repeats
    # Each image's masks, ratio by ratio from its own generator (the order of the one-image code).
    masks: list[list] = [[] for _ in settings.ratios]
    for image in images:
        gen = _image_generator(image_hash(image), settings.seed)
        for r, ratio in enumerate(settings.ratios):
            masks[r].append(random_patch_mask(n, num, ratio, generator=gen))  # on the CPU
    image_patches = patchify(x, p).flatten(0, 1)  # (B * N, P * P * C), the layout of the MAE's pixel head
    bf16 = settings.precision == "bf16"
    maps = []
    with _explicit_attention(mae, bf16 and x.device.type == "cpu"), _gelu_in_place(mae):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            tokens = mae.embed(x)  # once for every ratio's maskings
        for pms in masks:
            pm = PatchMask(*(torch.cat([getattr(m, f) for m in pms]).to(x.device)
                             for f in ("ids_keep", "ids_restore", "mask")))
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                feats = mae.masked_patch_features(x, pm, n, tokens)  # (S, F): the masked patches only
            # Eq. 4: each patch's mean over the maskings that hid it, summed in masking order; a
            # patch no masking hid keeps the image's pixels. The pixel head is linear, so it maps
            # the mean of the features to the mean of the pixels: it runs once per patch.
            count = pm.mask.view(b, n, num).sum(1).flatten()[:, None]
            total = _sum_over_maskings(feats.float(), pm.mask, n, dense=x.device.type != "cpu")
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                pixels = mae.patch_pixels(total / count.clamp_min(1))
            if settings.kind in ("absdiff", "mse"):  # pixelwise: taken in the patches' layout,
                # each patch's pixels as a (C, P * P, 1) image for residual()
                as_images = [t.view(-1, p * p, c).transpose(1, 2)[..., None] for t in (image_patches, pixels.float())]
                res = residual(*as_images, settings.kind)[:, 0, :, 0]
                res = torch.where(count > 0, res, 0.0)  # an unhidden patch keeps its pixels: residual 0
                maps.append(unpatchify(res.view(b, num, p * p), p, grid, 1)[:, 0])
            else:
                mean = torch.where(count > 0, pixels.float(), image_patches)
                mean = unpatchify(mean.view(b, num, -1), p, grid, c)
                maps.append(residual(x, mean, settings.kind)[:, 0])
    rm = torch.stack(maps, dim=1)
    if (h, w) != (size, size):
        rm = F.interpolate(rm, size=(h, w), mode="bilinear", align_corners=False)
    return rm.clamp(0, 1)


def _sum_over_maskings(pred: torch.Tensor, mask: torch.Tensor, repeats: int, dense: bool) -> torch.Tensor:
    """(B * N, D): per image and patch, the sum of ``pred``'s rows (one per True of the
    (B * repeats, N) ``mask``, row-major) over the image's maskings, in masking order.

    On a CPU index_add_ adds row after row, so the sum is the same on every run; a GPU's adds in
    any order, so there (``dense``) the rows are scattered per masking and summed instead."""
    rows, num = mask.shape
    if dense:
        hidden = pred.new_zeros(rows * num, pred.shape[-1])
        hidden[mask.flatten()] = pred
        return hidden.view(rows // repeats, repeats, num, -1).sum(1).flatten(0, 1)
    row, patch = mask.nonzero(as_tuple=True)
    target = torch.div(row, repeats, rounding_mode="floor") * num + patch
    return pred.new_zeros(rows // repeats * num, pred.shape[-1]).index_add_(0, target, pred)


@contextlib.contextmanager
def _attributes_set(changes: list[tuple[object, str, object]]):
    """Inside, each (object, name, value) of ``changes`` is set; the old values come back after."""
    before = [getattr(obj, name) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), old in zip(changes, before):
            setattr(obj, name, old)


def _explicit_attention(module: nn.Module, enabled: bool):
    """Attention as softmax(q k^T) v (timm's unfused path) inside, where ``enabled``: at the MAE's
    16-64 tokens per image, PyTorch's CPU flash attention ran 2.2-2.5x slower in bf16 than
    the explicit products (measured on a 2-core EPYC Zen 5, one thread; docs/grcsf.md)."""
    return _attributes_set([(m, "fused_attn", False) for m in module.modules()
                            if enabled and isinstance(getattr(m, "fused_attn", None), bool)])


class _GELUInPlace(nn.GELU):
    """GELU that overwrites its input: for forwards without autograd, where the MLP's hidden
    activations are a fresh tensor nothing else reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


def _gelu_in_place(module: nn.Module):
    """Inside, the GELUs of ``module``'s MLPs (``mlp.act`` of timm's blocks) work in place: the
    maps' forward runs without autograd, and not allocating the (tokens, 4 x width) result of
    each was 1.09x the bf16 maps' speed (one thread, Zen 5; docs/grcsf.md)."""
    return _attributes_set([(m, "act", _GELUInPlace(approximate=m.act.approximate)) for m in module.modules()
                            if type(getattr(m, "act", None)) is nn.GELU and hasattr(m, "fc1")])


__all__ = ["IMAGES_PER_FORWARD", "MAP_PRECISIONS", "RESIDUAL_KINDS", "ResidualMapSettings", "image_hash", "residual", "residual_maps", "ssim_map"]
