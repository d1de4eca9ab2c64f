"""GRCSF (Global and Regional Compensation Segmentation Framework) on the UNet++ backbone.

The segmentation network of GRCSF (Sec. 3): a UNet++ (:mod:`lesionkit.models.unetpp`) whose

- skip concatenations go through a GCU (Eq. 1-2, :class:`GlobalCompensationUnit`): at decoder
  node x[i][j] the first skip F = x[i][0] is compensated with S = x[i + 1][0] (the feature
  down-sampled from it) and the node's up-sampled input U, giving C (replaces x[i][0] in the
  concatenation) and the residual map R; the later skips x[i][1..j-1] of that row take R as
  well (Sec. 3.4 / Fig. 2), by addition (``gcu_later_skips="add"``, the words of Sec. 3.4) or
  by Eq. 2's re-weighting R * X + X (``"reweight"``);
- last decoder stages (x[2][2], x[1][3], x[0][4] for 5 levels) take an RCU (Eq. 6,
  :class:`RegionalCompensationUnit`) on their up-sampled input U: M replaces U in that node's
  concatenation and in its GCU. Patch sizes (8, 8, 16) at 224 px (Sec. 4), scaled with
  ``img_size`` to the nearest divisor of each stage's side (512 px gives (16, 16, 32), the
  paper's orCaScore setting; 128 px gives (4, 4, 8)).

``forward(image, residual_maps)``: residual_maps (B, num_residual_maps * residual_channels, H, W)
are the MAE residual maps at the image's size (Eq. 3-5; maps at mask ratios 0.5 and 0.75 by
default), in the order the RCU's W1, W2 weigh them. They are required whenever ``use_rcu``,
unless the model carries its MAE (``mae={"name": ..., "kwargs": ...}``, set by the ``grcsf``
trainer from ``grcsf.mae_checkpoint``): then a forward without them computes them with
:func:`lesionkit.layers.residual_maps.residual_maps` and the ``residual_*`` settings - the same
maps, seeded per image, as ``lesionkit residual-maps`` caches for training - so a GRCSF
checkpoint evaluates and predicts on its own. The MAE is frozen (no gradients, always in eval
mode) and its weights are part of the state dict.

Every part is a switch (GRCSF Tables 3 and 7): ``use_gcu=False, use_rcu=False`` is the UNet++
baseline (same parameters and output); ``use_rcu=False`` is "GRCSF w/o RCU";
``use_importance_score=False`` is "w/o Importance Score in RCU". See docs/grcsf.md for the
parameter count against the paper's 42.85M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.layers.grcsf import GlobalCompensationUnit, RegionalCompensationUnit
from lesionkit.models.output import SegmentationOutput
from lesionkit.models.registry import build_config, register_model
from lesionkit.models.unetpp import UNetPlusPlus, UNetPlusPlusConfig, init_convs

_LATER_SKIPS = ("add", "reweight", "none")


@dataclass
class GRCSFConfig:
    in_chans: int = 3
    num_classes: int = 1
    # Backbone (UNet++): channels per level, top to bottleneck.
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    deep_supervision: bool = False
    align_corners: bool = True
    # Convolutions of the backbone, GCUs and RCUs (not the frozen MAE): "he" = He normal weights
    # and zero biases (the paper's implementation details), "torch" = PyTorch's defaults.
    conv_init: str = "he"
    # GCU (Eq. 1-2) at every skip concatenation; Table 3 "UNet++" row when off with the RCU.
    use_gcu: bool = True
    # How the first skip's residual R reaches the later skips of its row (Fig. 2):
    # "add" X + R, "reweight" R * X + X (Eq. 2's form), "none" not at all.
    gcu_later_skips: str = "add"
    se_reduction: int = 16
    # RCU (Eq. 6) on the last len(patch_sizes) decoder stages; Table 3 "w/o RCU" when off.
    use_rcu: bool = True
    use_importance_score: bool = True  # Table 3 "w/o Importance Score in RCU" when off
    num_residual_maps: int = 2  # mask ratios 0.5 and 0.75 (Table 5)
    residual_channels: int = 1  # channels of each map (1: grayscale, as in the paper)
    # Patch sizes, deepest of the RCU stages first, at patch_reference_size px (Sec. 4 / Table 6);
    # scaled to img_size. Set patch_reference_size = img_size to use them as they are.
    patch_sizes: tuple[int, ...] = (8, 8, 16)
    # Decoder levels of those stages left without an RCU (0 = the top, at the input's resolution;
    # 1 and 2 the next): "it can be selectively disconnected from specific layers" (Sec. 4).
    rcu_disconnected: tuple[int, ...] = ()
    patch_reference_size: int = 224
    img_size: int = 224
    rcu_heads: int = 1
    score_hidden: int = 64
    # How the RCU starts and sees the maps (lesionkit.layers.grcsf.RegionalCompensationUnit,
    # docs/grcsf.md): W1, W2's start value (0 = the identity at init, SAGAN's choice) and a
    # learning-rate multiplier for them; per-image standardised maps ("image") or raw ("none");
    # keys from maps embedded to C channels ("conv", RM' of Eq. 6) or a 1x1 projection ("linear").
    rcu_gate_init: float = 0.1
    rcu_gate_lr_scale: float = 1.0
    rcu_map_norm: str = "image"
    rcu_key_embed: str = "conv"
    # The frozen MAE that makes the maps when forward gets none: {"name": "mae_vit_tiny", "kwargs": {...}}.
    mae: dict | None = None
    # How it makes them (lesionkit.layers.residual_maps; the residual-maps command's flags).
    residual_ratios: tuple[float, ...] = (0.5, 0.75)
    residual_repeats: int = 5
    residual_kind: str = "absdiff"
    residual_seed: int = 0
    residual_precision: str = "fp32"  # the MAE's forward for the maps: fp32 | bf16

    def __post_init__(self) -> None:
        depth = len(self.widths) - 1
        if self.gcu_later_skips not in _LATER_SKIPS:
            raise ValueError(f"gcu_later_skips should be one of {_LATER_SKIPS}, got {self.gcu_later_skips!r}")
        if not 1 <= len(self.patch_sizes) <= depth or any(int(p) < 1 for p in self.patch_sizes):
            raise ValueError(f"patch_sizes should list 1 to {depth} positive sizes (one per RCU stage), "
                             f"got {self.patch_sizes}")
        stages = len(self.patch_sizes)
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < stages for v in self.rcu_disconnected):
            raise ValueError(f"rcu_disconnected should list decoder levels of the {stages} RCU stage(s), "
                             f"0 to {stages - 1} (0 = the top), got {list(self.rcu_disconnected)}")
        if self.use_rcu and len(set(self.rcu_disconnected)) == stages:
            raise ValueError(f"rcu_disconnected {list(self.rcu_disconnected)} leaves no RCU stage; "
                             f"set use_rcu=False for GRCSF without the RCU")
        if self.num_residual_maps < 1 or self.residual_channels < 1:
            raise ValueError(f"num_residual_maps and residual_channels should be >= 1, got "
                             f"{self.num_residual_maps} and {self.residual_channels}")
        if self.mae is not None:
            if not isinstance(self.mae, dict) or not isinstance(self.mae.get("name"), str):
                raise ValueError(f"mae should be a dict {{'name': MAE model, 'kwargs': {{...}}}}, got {self.mae!r}")
            if len(self.residual_ratios) != self.num_residual_maps or self.residual_channels != 1:
                raise ValueError(f"with an mae, num_residual_maps should equal len(residual_ratios) and "
                                 f"residual_channels be 1 (one map per ratio), got {self.num_residual_maps}, "
                                 f"{list(self.residual_ratios)} and {self.residual_channels}")
        reduction = 2 ** depth
        if self.img_size < reduction or self.img_size % reduction or self.patch_reference_size < 1:
            raise ValueError(f"img_size should be a positive multiple of {reduction} and "
                             f"patch_reference_size positive, got {self.img_size} and "
                             f"{self.patch_reference_size}")


def scaled_patch_sizes(patch_sizes: tuple[int, ...], reference: int, img_size: int) -> tuple[int, ...]:
    """Patch sizes at ``img_size`` for the last len(patch_sizes) decoder stages (deepest first):
    p * img_size / reference rounded to the nearest divisor of the stage's side (ties: the
    larger), so every stage splits into whole windows."""
    out = []
    n = len(patch_sizes)
    for k, p in enumerate(patch_sizes):
        side = img_size // 2 ** (n - 1 - k)  # the top stage (k = n - 1) is at full size
        target = p * img_size / reference
        divisors = [d for d in range(1, side + 1) if side % d == 0]
        out.append(min(divisors, key=lambda d: (abs(d - target), -d)))
    return tuple(out)


class GRCSF(nn.Module):
    """UNet++ with GCUs on its skips and RCUs on its last decoder stages.

    ``forward(image, residual_maps=None)`` returns logits (B, num_classes, H, W), or a
    SegmentationOutput with each head's logits when deep supervision is on.
    """

    def __init__(self, cfg: GRCSFConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = UNetPlusPlus(UNetPlusPlusConfig(cfg.in_chans, cfg.num_classes, cfg.widths,
                                                        cfg.deep_supervision, cfg.align_corners,
                                                        cfg.conv_init))
        w = [int(c) for c in cfg.widths]
        self.depth = depth = len(w) - 1
        # gcus[i][j - 1] serves decoder node x[i][j].
        self.gcus = nn.ModuleList(
            nn.ModuleList(GlobalCompensationUnit(w[i], w[i + 1], w[i + 1], cfg.se_reduction)
                          for _ in range(depth - i))
            for i in range(depth)) if cfg.use_gcu else None
        sizes = scaled_patch_sizes(tuple(int(p) for p in cfg.patch_sizes), cfg.patch_reference_size, cfg.img_size)
        n = len(sizes)
        # rcus[k] serves the up-sampled input of x[level][depth - level] for the k-th connected
        # level, deepest first, whose channels are those of level + 1.
        stages = [(n - 1 - k, p) for k, p in enumerate(sizes) if n - 1 - k not in cfg.rcu_disconnected]
        self.rcu_levels = tuple(level for level, _ in stages)
        self.patch_sizes = tuple(p for _, p in stages)
        self.rcus = nn.ModuleList(
            RegionalCompensationUnit(w[level + 1], p, cfg.residual_channels, cfg.num_residual_maps,
                                     cfg.rcu_heads, cfg.score_hidden, cfg.use_importance_score,
                                     cfg.rcu_gate_init, cfg.rcu_gate_lr_scale, cfg.rcu_map_norm,
                                     cfg.rcu_key_embed)
            for level, p in zip(self.rcu_levels, self.patch_sizes)) if cfg.use_rcu else None
        init_convs(self.gcus or nn.Module(), cfg.conv_init)
        init_convs(self.rcus or nn.Module(), cfg.conv_init)
        from lesionkit.layers.residual_maps import ResidualMapSettings

        # Checked here even without an MAE, so a bad residual_kind fails when the model is built.
        self.residual_settings = ResidualMapSettings(tuple(cfg.residual_ratios), cfg.residual_repeats,
                                                     cfg.residual_kind, cfg.residual_seed,
                                                     cfg.residual_precision)
        self.mae = None
        if cfg.mae is not None:
            from lesionkit.models.registry import create_model

            self.mae = create_model(cfg.mae["name"], **dict(cfg.mae.get("kwargs") or {}))
            self.mae.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "GRCSF":
        super().train(mode)
        if self.mae is not None:
            self.mae.eval()  # frozen: the maps never depend on the mode
        return self

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=self.cfg.align_corners)

    def _split_maps(self, residual_maps: torch.Tensor | None, image: torch.Tensor) -> list[torch.Tensor] | None:
        cfg = self.cfg
        channels = cfg.num_residual_maps * cfg.residual_channels
        expected = f"(B={image.shape[0]}, {channels}, {image.shape[-2]}, {image.shape[-1]})"
        if residual_maps is None:
            if cfg.use_rcu:
                raise ValueError(f"residual_maps are required when use_rcu=True: a tensor {expected} "
                                 f"holding {cfg.num_residual_maps} MAE residual map(s) of "
                                 f"{cfg.residual_channels} channel(s) each")
            return None
        if not isinstance(residual_maps, torch.Tensor):
            raise ValueError(f"residual_maps should be a tensor {expected}, got {type(residual_maps).__name__}")
        if residual_maps.ndim != 4 or tuple(residual_maps.shape) != (image.shape[0], channels, *image.shape[-2:]):
            raise ValueError(f"residual_maps should be {expected} ({cfg.num_residual_maps} map(s) x "
                             f"{cfg.residual_channels} channel(s) at the image's size), got "
                             f"{tuple(residual_maps.shape)}")
        if residual_maps.device != image.device:
            raise ValueError(f"residual_maps should be on the image's device {image.device}, got "
                             f"{residual_maps.device}")
        return list(residual_maps.split(cfg.residual_channels, dim=1))

    def forward(self, image: torch.Tensor,
                residual_maps: torch.Tensor | None = None) -> torch.Tensor | SegmentationOutput:
        cfg = self.cfg
        if image.ndim != 4 or image.shape[1] != cfg.in_chans:
            raise ValueError(f"image should be (B, {cfg.in_chans}, H, W), got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if h % self.backbone.reduction or w % self.backbone.reduction:
            raise ValueError(f"image height and width should be multiples of {self.backbone.reduction}, "
                             f"got {h}x{w}")
        if residual_maps is None and self.mae is not None and cfg.use_rcu:
            from lesionkit.layers.residual_maps import residual_maps as make_maps

            residual_maps = make_maps(self.mae, image.detach(), self.residual_settings).to(image.dtype)
        maps = self._split_maps(residual_maps, image)
        if self.rcus is not None:
            for level, p in zip(self.rcu_levels, self.patch_sizes):
                if (h >> level) % p or (w >> level) % p:
                    raise ValueError(
                        f"image {h}x{w} does not split into the RCU's {p}x{p} patches at decoder level "
                        f"{level} ({h >> level}x{w >> level}); patch sizes {self.patch_sizes} were set "
                        f"for img_size={cfg.img_size}")
        nodes, depth = self.backbone.nodes, self.depth
        rcu_at = {level: k for k, level in enumerate(self.rcu_levels)} if self.rcus is not None else {}
        grid: list[list[torch.Tensor]] = [[] for _ in range(depth + 1)]
        for i in range(depth + 1):  # encoder column, then each anti-diagonal of decoder nodes
            grid[i].append(nodes[i][0](image if i == 0 else F.max_pool2d(grid[i - 1][0], 2)))
            for j in range(1, i + 1):
                level = i - j
                up = self._up(grid[level + 1][j - 1])
                if j == depth - level and level in rcu_at:  # a last decoder stage: M replaces U (Eq. 6)
                    up = self.rcus[rcu_at[level]](up, maps)
                skips = grid[level]
                if self.gcus is not None:
                    compensated, residual = self.gcus[level][j - 1](skips[0], grid[level + 1][0], up)
                    later = skips[1:]
                    if cfg.gcu_later_skips == "add":
                        later = [s + residual for s in later]
                    elif cfg.gcu_later_skips == "reweight":
                        later = [residual * s + s for s in later]
                    skips = [compensated, *later]
                grid[level].append(nodes[level][j](torch.cat([*skips, up], dim=1)))
        heads = self.backbone.heads
        if not cfg.deep_supervision:
            return heads[0](grid[0][depth])
        logits = [head(grid[0][j + 1]) for j, head in enumerate(heads)]
        extras = {f"deep_supervision_{j + 1}": out for j, out in enumerate(logits)}
        return SegmentationOutput(torch.stack(logits).mean(dim=0), extras)


def _grcsf(name: str, defaults: dict, kwargs: dict) -> GRCSF:
    return GRCSF(build_config(GRCSFConfig, defaults, kwargs, name))


_SMOKE = {"kwargs": {"img_size": 64}, "input_size": (3, 64, 64), "inputs": {"residual_maps": (2, 64, 64)}}


@register_model(smoke_test={**_SMOKE, "kwargs": {"widths": (8, 16, 32, 64, 128), "img_size": 64}})
def grcsf_unetpp(**kwargs) -> GRCSF:
    """GRCSF on the paper-size UNet++ (widths 64..1024), 224 px, two residual maps."""
    return _grcsf("grcsf_unetpp", {}, kwargs)


@register_model(smoke_test=_SMOKE)
def grcsf_tiny(**kwargs) -> GRCSF:
    """GRCSF on unetpp_tiny's widths (16..256) for 128 px on a CPU; patch sizes (4, 4, 8)."""
    return _grcsf("grcsf_tiny", {"widths": (16, 32, 64, 128, 256), "img_size": 128}, kwargs)


__all__ = ["GRCSF", "GRCSFConfig", "grcsf_tiny", "grcsf_unetpp", "scaled_patch_sizes"]
