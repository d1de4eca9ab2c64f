"""TransUNet (Chen et al. 2021): R50 + ViT-B/16 hybrid encoder + Cascaded Upsampler (CUP).

The encoder is assembled from the parts of timm's ``vit_base_r50_s16_224`` - a ResNetV2 (3, 4, 9)
stem with standardised convs and group norm, its 1x1 ``HybridEmbed`` projection, 12 ViT-B blocks
and the final norm - held in a timm ``VisionTransformer`` so that timm's checkpoint loads by name.
TransUNet's choices on top: no class token, a 14x14 position grid at 224 px (resampled for other
sizes), skips from the CNN at 1/8, 1/4 and 1/2 resolution (512, 256, 64 channels; TransUNet's
fourth skip of 16 channels is off with its ``n_skip = 3``), decoder (256, 128, 64, 16) and a 3x3
head: 105,276,066 parameters at ``num_classes=2``, as the official code has.

``transunet_tiny`` keeps the layout at a width and depth that trains on a laptop CPU at 128 px.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from lesionkit.layers.cascaded_upsampler import CascadedUpsampler
from lesionkit.layers.patch_masking import PatchMask, patch_mask_to_pixels
from lesionkit.models.registry import build_config, register_model

# timm's ImageNet-21k weights of vit_base_r50_s16_224 (the R50-ViT-B_16 TransUNet starts from).
TIMM_WEIGHTS = "timm/vit_base_r50_s16_224.orig_in21k"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
COLOR_CONSTANCY = ("none", "gray_world")


@dataclass
class TransUNetConfig:
    in_chans: int = 3
    num_classes: int = 1
    img_size: int = 224  # the learned position grid is img_size / 16 square; other sizes resample it
    # ResNetV2 hybrid stem (timm vit_base_r50_s16_224): blocks per stage, output channels per stage.
    cnn_layers: tuple[int, ...] = (3, 4, 9)
    cnn_channels: tuple[int, ...] = (256, 512, 1024)
    cnn_stem_channels: int = 64
    cnn_norm_groups: int = 32
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_rate: float = 0.1  # TransUNet's dropout after the position embedding and in the MLPs
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    decoder_head_channels: int = 512
    decoder_channels: tuple[int, ...] = (256, 128, 64, 16)
    n_skip: int = 3  # CNN skips fed to the CUP, coarse to fine (TransUNet: 3)
    # The timm weights expect (x - 0.5) / 0.5 on [0, 1] images; lesionkit datasets give [0, 1].
    input_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    input_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # "gray_world" rescales each channel to the image's mean gray before the network (SegMAE on
    # ISIC 2017, after Cheng et al.); part of the model so that evaluation and prediction apply it too.
    color_constancy: str = "none"
    pretrained: bool = False  # load timm's cached ImageNet-21k weights into the encoder (never downloads)
    pretrained_file: str | None = None  # or load them from this file (safetensors / torch state dict)

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.in_chans < 1:
            raise ValueError(f"num_classes and in_chans should be >= 1, got {self.num_classes} and {self.in_chans}")
        if not self.cnn_layers or len(self.cnn_layers) != len(self.cnn_channels):
            raise ValueError(f"cnn_layers and cnn_channels should have one entry per CNN stage, got {self.cnn_layers} "
                             f"and {self.cnn_channels}")
        reduction = self.reduction
        if self.img_size < reduction or self.img_size % reduction:
            raise ValueError(f"img_size should be a positive multiple of {reduction}, got {self.img_size}")
        if len(self.decoder_channels) != len(self.cnn_layers) + 1:
            raise ValueError(f"decoder_channels should have {len(self.cnn_layers) + 1} stages (x2 each, back from 1/{reduction}), "
                             f"got {self.decoder_channels}")
        if not 0 <= self.n_skip <= len(self.cnn_layers):
            raise ValueError(f"n_skip should be in [0, {len(self.cnn_layers)}], got {self.n_skip}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) should be a multiple of num_heads ({self.num_heads})")
        if self.color_constancy not in COLOR_CONSTANCY:
            raise ValueError(f"color_constancy should be one of {list(COLOR_CONSTANCY)}, got {self.color_constancy!r}")
        if len(self.input_mean) != self.in_chans or len(self.input_std) != self.in_chans:
            raise ValueError(f"input_mean and input_std should have in_chans={self.in_chans} entries, got "
                             f"{self.input_mean} and {self.input_std}")

    @property
    def reduction(self) -> int:
        """Input pixels per token side: the stem's /4 and /2 per later CNN stage."""
        return 4 * 2 ** (len(self.cnn_layers) - 1)


@dataclass
class EncoderOutput:
    tokens: torch.Tensor  # (B, K, D) after the final norm; K = N, or the visible count when masked
    grid_size: tuple[int, int]  # token grid (H / reduction, W / reduction)
    skips: list[torch.Tensor]  # CNN features, coarse to fine (1/8, 1/4, 1/2 for R50)


class HybridViTEncoder(nn.Module):
    """ResNetV2 stem -> 1x1 projection -> (optional MAE masking) -> ViT blocks, keeping the CNN skips."""

    def __init__(self, cfg: TransUNetConfig) -> None:
        # timm is imported here, not at module level: it adds ~2 s to `import lesionkit.models`.
        from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
        from timm.models.resnetv2 import ResNetV2
        from timm.models.vision_transformer import VisionTransformer

        super().__init__()
        self.cfg = cfg
        self.reduction = cfg.reduction
        backbone = ResNetV2(
            layers=list(cfg.cnn_layers), channels=tuple(cfg.cnn_channels), num_classes=0, global_pool="",
            in_chans=cfg.in_chans, preact=False, stem_type="same", stem_chs=cfg.cnn_stem_channels,
            conv_layer=partial(StdConv2dSame, eps=1e-8),
            norm_layer=partial(GroupNormAct, num_groups=cfg.cnn_norm_groups))
        # The parts of timm's vit_base_r50_s16_224, with TransUNet's choice of no class token.
        self.vit = VisionTransformer(
            img_size=cfg.img_size, patch_size=1, in_chans=cfg.in_chans, num_classes=0, global_pool="",
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            class_token=False, pos_drop_rate=cfg.drop_rate, proj_drop_rate=cfg.drop_rate,
            attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
            embed_layer=partial(HybridEmbed, backbone=backbone))
        self.grid_size = tuple(self.vit.patch_embed.grid_size)
        feats = backbone.feature_info  # stem (1/2), then one entry per stage
        # Skips coarse to fine: every stage but the last, then the stem.
        self.skip_channels = [f["num_chs"] for f in reversed(feats[:-1])]
        self.embed_dim = cfg.embed_dim
        self.register_buffer("input_mean", torch.tensor(cfg.input_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(cfg.input_std).view(1, -1, 1, 1), persistent=False)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"x should be (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.reduction or w % self.reduction or h == 0 or w == 0:
            raise ValueError(f"input height and width should be positive multiples of {self.reduction}, got {h}x{w}")

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The [0, 1] image the network sees: ``x`` after the colour normalisation, if any."""
        if self.cfg.color_constancy == "gray_world":
            # Gray-world assumption: the average colour of a scene is gray.
            channel_mean = x.mean(dim=(-2, -1), keepdim=True)
            gray = channel_mean.mean(dim=1, keepdim=True)
            x = (x * gray / channel_mean.clamp_min(1e-6)).clamp(0.0, 1.0)
        return x

    def pos_embed(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """The learned (1, N, D) position embedding, resampled (bicubic) when the grid differs from training's."""
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(self.vit.pos_embed, new_size=list(grid_size), old_size=list(self.grid_size),
                                      num_prefix_tokens=0)

    def forward(self, x: torch.Tensor, patch_mask: PatchMask | None = None, mask_mode: str = "token") -> EncoderOutput:
        """Encode ``x``; with ``patch_mask`` only the visible tokens go through the ViT (SegMAE Eq. 2).

        ``mask_mode="pixel"`` also blanks the masked 16x16 image patches (to the normalised mean,
        0) before the CNN; ``"token"`` lets the CNN see the whole image.
        """
        self.check_input(x)
        x = self.prepare_input(x)
        x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        grid = (x.shape[-2] // self.reduction, x.shape[-1] // self.reduction)
        if patch_mask is not None and mask_mode == "pixel":
            x = x.masked_fill(patch_mask_to_pixels(patch_mask.mask, self.reduction, grid), 0.0)
        backbone = self.vit.patch_embed.backbone
        skips: list[torch.Tensor] = []
        for i, layer in enumerate(backbone.stem):
            x = layer(x)
            if i == backbone.stem_feat_idx:  # the stride-2 features before the stem's max pool
                skips.append(x)
        for stage in backbone.stages:
            x = stage(x)
            skips.append(x)
        x = backbone.norm(skips.pop())
        x = self.vit.patch_embed.proj(x)
        if tuple(x.shape[-2:]) != grid:
            raise RuntimeError(f"the CNN produced a {tuple(x.shape[-2:])} grid for a {grid} token grid")
        tokens = x.flatten(2).transpose(1, 2) + self.pos_embed(grid).to(x.dtype)
        tokens = self.vit.pos_drop(tokens)
        if patch_mask is not None:
            tokens = torch.gather(tokens, 1, patch_mask.ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        tokens = self.vit.norm(self.vit.blocks(tokens))
        return EncoderOutput(tokens=tokens, grid_size=grid, skips=skips[::-1])

    def load_timm_weights(self, path: str | Path) -> None:
        """Load a timm ``vit_base_r50_s16_224`` state dict (class token dropped, position grid resampled)."""
        from timm.layers import resample_abs_pos_embed

        state = _read_state_dict(Path(path))
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        state.pop("cls_token", None)
        for key in [k for k in state if k.startswith("head.") or k.startswith("fc_norm.")]:
            state.pop(key)
        if "pos_embed" in state:
            pos = state["pos_embed"]
            n_grid = pos.shape[1]
            side = int(round(n_grid ** 0.5))
            prefix = n_grid - side * side  # the class token's position (1 in timm's weights)
            if prefix < 0 or prefix > 1:
                raise ValueError(f"{path}: pos_embed of shape {tuple(pos.shape)} is not a square grid (+ class token)")
            state["pos_embed"] = resample_abs_pos_embed(pos[:, prefix:], new_size=list(self.grid_size),
                                                        old_size=[side, side], num_prefix_tokens=0)
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not hold vit_base_r50_s16_224 weights for this encoder: missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained_file {str(path)!r} should hold a state dict, got {type(state).__name__}")
    return state


def cached_timm_weights() -> Path | None:
    """The local Hugging Face cache's copy of :data:`TIMM_WEIGHTS`, or ``None``; never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in _WEIGHT_FILES:
        found = try_to_load_from_cache(TIMM_WEIGHTS, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def resolve_pretrained_file(cfg: TransUNetConfig, model: str) -> Path | None:
    """The weight file ``cfg`` asks for, or a ValueError that says how to get it."""
    if cfg.pretrained_file:
        return Path(cfg.pretrained_file)
    if not cfg.pretrained:
        return None
    if (cfg.embed_dim, cfg.depth, tuple(cfg.cnn_layers), tuple(cfg.cnn_channels)) != (768, 12, (3, 4, 9), (256, 512, 1024)):
        raise ValueError(f"pretrained=True loads ViT-B/16 + R50 weights; model {model!r} has embed_dim={cfg.embed_dim}, "
                         f"depth={cfg.depth}, cnn_layers={cfg.cnn_layers}, which they do not fit")
    found = cached_timm_weights()
    if found is None:
        raise ValueError(
            f"pretrained=True: timm's weights {TIMM_WEIGHTS!r} are not in the local Hugging Face cache "
            "(lesionkit never downloads). Fetch them once where there is network access, e.g. "
            "`python -c \"import timm; timm.create_model('vit_base_r50_s16_224.orig_in21k', pretrained=True)\"` "
            "(HF_HOME / HF_HUB_CACHE choose the cache), pass pretrained_file=PATH to a saved state dict, or set "
            "pretrained=False to start from random weights (lesionkit train: --set model.kwargs.pretrained=false).")
    return found


class TransUNet(nn.Module):
    """Hybrid encoder + CUP + 3x3 head; returns logits (B, num_classes, H, W)."""

    def __init__(self, cfg: TransUNetConfig, model_name: str = "transunet") -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = HybridViTEncoder(cfg)
        n_stages = len(cfg.decoder_channels)
        skips = [c if i < cfg.n_skip else 0 for i, c in enumerate(self.encoder.skip_channels)]
        skips += [0] * (n_stages - len(skips))  # no CNN features at full resolution
        self.decoder = CascadedUpsampler(cfg.embed_dim, cfg.decoder_head_channels, cfg.decoder_channels, skips)
        self.head = nn.Conv2d(cfg.decoder_channels[-1], cfg.num_classes, 3, padding=1)
        weights = resolve_pretrained_file(cfg, model_name)
        if weights is not None:
            self.encoder.load_timm_weights(weights)

    def segment(self, tokens: torch.Tensor, grid_size: tuple[int, int], skips: list[torch.Tensor]) -> torch.Tensor:
        """CUP + head on a full (B, N, D) token grid."""
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, *grid_size)
        return self.head(self.decoder(x, skips))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder(x)
        return self.segment(enc.tokens, enc.grid_size, enc.skips)


def _transunet(name: str, defaults: dict, kwargs: dict) -> TransUNet:
    return TransUNet(build_config(TransUNetConfig, defaults, kwargs, name), name)


# Registry smoke test: the same widths at one ViT / one MAE block and one CNN block per stage.
@register_model(smoke_test={"kwargs": {"depth": 1, "cnn_layers": (1, 1, 1)}})
def transunet_r50_vit_b16(**kwargs) -> TransUNet:
    """TransUNet R50-ViT-B/16 (105,276,066 parameters at 2 classes, 224 px); ``pretrained=True`` for timm's weights."""
    return _transunet("transunet_r50_vit_b16", {}, kwargs)


# The tiny layout, shared with segmae_tiny: 128 px, 8x8 tokens, a one-block-per-stage stem.
TINY_DEFAULTS = dict(
    img_size=128, cnn_layers=(1, 1, 2), cnn_channels=(64, 128, 256), cnn_stem_channels=32, cnn_norm_groups=8,
    embed_dim=192, depth=4, num_heads=3, drop_rate=0.0, decoder_head_channels=128, decoder_channels=(64, 32, 16, 8),
)


@register_model
def transunet_tiny(**kwargs) -> TransUNet:
    """Narrow, shallow TransUNet for 128-px input (CPU training in minutes)."""
    return _transunet("transunet_tiny", TINY_DEFAULTS, kwargs)


__all__ = ["EncoderOutput", "HybridViTEncoder", "TIMM_WEIGHTS", "TransUNet", "TransUNetConfig", "cached_timm_weights",
           "transunet_r50_vit_b16", "transunet_tiny"]
