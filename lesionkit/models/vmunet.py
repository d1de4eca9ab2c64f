"""VM-UNet (Ruan and Xiang, 2024) and the CM-SSM U-Net built on it, on lesionkit's SS2D kernels.

Network: PatchEmbed2D (4x4, stride 4) -> four encoder stages of VSS blocks, PatchMerging2D after
the first three -> four decoder stages (PatchExpand2D before the last three), the skip of the
matching encoder stage added before each (``layer_up(x + skip)``) -> 4x final expand and a 1x1
conv. Module names follow VM-UNet's ``VSSM`` so that official checkpoints load
(:mod:`lesionkit.models.vmunet_checkpoint`). The model returns logits (VM-UNet applies the
sigmoid inside its forward for one class; we leave it to the loss and the metrics).

CM-SSM (``cmssm_unet``, see :mod:`lesionkit.models.cmssm`) switches on SE and the Channel
Mixing Network inside every block and Cross-Region Attention on the skips; its feature
distillation losses read the block outputs that :meth:`VMUNet.forward_intermediates` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lesionkit.layers.cross_region_attention import CrossRegionAttention
from lesionkit.layers.vss_block import ChannelMixing, SqueezeExcitation, VSSBlock
from lesionkit.layers.vss_patches import FinalPatchExpand2D, PatchEmbed2D, PatchExpand2D, PatchMerging2D
from lesionkit.models.registry import build_config, register_model

PATCH_SIZE = 4


@dataclass
class VMUNetConfig:
    in_chans: int = 3  # 1-channel input is repeated to 3, as VM-UNet does
    num_classes: int = 1
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    depths_decoder: tuple[int, ...] = (2, 2, 2, 1)
    d_state: int = 16
    drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    # An official VM-UNet state dict (keys vmunet.*) or a VMamba v0 classification checkpoint
    # ({"model": state_dict}); see lesionkit.models.vmunet_checkpoint.
    pretrained_file: str | None = None

    def __post_init__(self) -> None:
        n = len(self.dims)
        if n < 2 or len(self.depths) != n or len(self.depths_decoder) != n:
            raise ValueError(f"dims, depths and depths_decoder should have the same length >= 2, got "
                             f"{self.dims}, {self.depths}, {self.depths_decoder}")
        if any(int(d) < 1 for d in self.dims) or any(int(d) < 1 for d in self.depths + self.depths_decoder):
            raise ValueError(f"dims and depths should be positive, got dims={self.dims}, depths={self.depths}, "
                             f"depths_decoder={self.depths_decoder}")
        if any(self.dims[i + 1] != 2 * self.dims[i] for i in range(n - 1)):
            raise ValueError(f"dims should double from stage to stage (patch merging maps C -> 2C), got {self.dims}")
        if self.dims[0] % 4:
            raise ValueError(f"dims[0] should be divisible by 4 (the final 4x expand), got {self.dims[0]}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans should be 1 or 3 (1-channel images are repeated to 3), got {self.in_chans}")
        if self.num_classes < 1 or self.d_state < 1:
            raise ValueError(f"num_classes and d_state should be >= 1, got {self.num_classes} and {self.d_state}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate should be in [0, 1), got {self.drop_path_rate}")

    @property
    def stride(self) -> int:
        return PATCH_SIZE * 2 ** (len(self.dims) - 1)


@dataclass
class CMSSMSwitches:
    """The CM-SSM parts on top of VM-UNet; all off is VM-UNet. The distillation losses (Eq. 8-10)
    are the recipe's (``cmssm:`` block, :mod:`lesionkit.engine.trainers.cmssm`), not the model's."""

    se: bool = False
    cmn: bool = False
    cra: bool = False
    se_reduction: int = 16
    cmn_ratio: float = 4.0
    # Where the paper is silent on initialisation, the added parts start so that the network
    # computes VM-UNet's function (ours): SE and CRA multiply by ``gate_init`` (null: the layers'
    # default init, SE at 0.5 and CRA near 0.25) and the CMN branch starts at zero.
    gate_init: float | None = 0.95
    cmn_zero_init: bool = True


class VSSLayer(nn.Module):
    """Encoder stage: VSS blocks, then (all but the last stage) patch merging."""

    def __init__(self, dim: int, depth: int, drop_path: list[float], d_state: int, drop: float, downsample: bool,
                 switches: CMSSMSwitches) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            VSSBlock(dim, drop_path[i], d_state, drop, se=switches.se, se_reduction=switches.se_reduction,
                     cmn=switches.cmn, cmn_ratio=switches.cmn_ratio) for i in range(depth)])
        self.downsample = PatchMerging2D(dim) if downsample else None


class VSSLayerUp(nn.Module):
    """Decoder stage: (all but the first stage) patch expanding, then VSS blocks."""

    def __init__(self, dim: int, depth: int, drop_path: list[float], d_state: int, drop: float, upsample: bool,
                 switches: CMSSMSwitches) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            VSSBlock(dim, drop_path[i], d_state, drop, se=switches.se, se_reduction=switches.se_reduction,
                     cmn=switches.cmn, cmn_ratio=switches.cmn_ratio) for i in range(depth)])
        self.upsample = PatchExpand2D(dim) if upsample else None


def _run(blocks: nn.ModuleList, x: torch.Tensor, features: list[torch.Tensor] | None) -> torch.Tensor:
    for blk in blocks:
        x = blk(x)
        if features is not None:
            features.append(x.permute(0, 3, 1, 2))
    return x


class VMUNet(nn.Module):
    """VM-UNet / CM-SSM U-Net: (B, in_chans, H, W) in [0, 1] -> logits (B, num_classes, H, W)."""

    def __init__(self, cfg: VMUNetConfig, switches: CMSSMSwitches | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.switches = sw = switches or CMSSMSwitches()
        dims = list(cfg.dims)
        dims_decoder = dims[::-1]
        n = len(dims)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        dpr_decoder = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths_decoder)).tolist()[::-1]
        self.patch_embed = PatchEmbed2D(PATCH_SIZE, 3, dims[0])
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.layers = nn.ModuleList()
        for i in range(n):
            start = sum(cfg.depths[:i])
            self.layers.append(VSSLayer(dims[i], cfg.depths[i], dpr[start:start + cfg.depths[i]], cfg.d_state,
                                        cfg.drop_rate, i < n - 1, sw))
        self.layers_up = nn.ModuleList()
        for i in range(n):
            start = sum(cfg.depths_decoder[:i])
            self.layers_up.append(VSSLayerUp(dims_decoder[i], cfg.depths_decoder[i],
                                             dpr_decoder[start:start + cfg.depths_decoder[i]], cfg.d_state,
                                             cfg.drop_rate, i != 0, sw))
        # CRA on the skips the decoder uses: inputs of encoder stages n-1 .. 1 (CM-SSM Sec. 3.3).
        self.skip_attention = (nn.ModuleList([CrossRegionAttention(dims_decoder[i - 1]) for i in range(1, n)])
                               if sw.cra else None)
        self.final_up = FinalPatchExpand2D(dims_decoder[-1], 4)
        self.final_conv = nn.Conv2d(dims_decoder[-1] // 4, cfg.num_classes, 1)
        self.apply(self._init_weights)
        for m in self.modules():
            if sw.gate_init is not None and isinstance(m, (SqueezeExcitation, CrossRegionAttention)):
                m.init_gate(sw.gate_init)
            if sw.cmn_zero_init and isinstance(m, ChannelMixing):
                m.zero_init_output()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # VM-UNet's init: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorms.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{type(self).__name__} expects images (B, 3, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
        s = self.cfg.stride
        height, width = x.shape[-2:]
        if height % s or width % s:
            raise ValueError(f"{type(self).__name__} needs H and W that are multiples of {s} (patch 4, "
                             f"{len(self.cfg.dims) - 1} patch mergings), got {height}x{width}")

    def block_names(self) -> list[str]:
        """Names of the VSS blocks in :meth:`forward_intermediates` order, as CM-SSM's Eq. 8-9
        write them: E1(1) .. En(d) for the encoder (E1 the shallowest), then Dn(1) .. D1(d)
        for the decoder (D1 the last, at H/4)."""
        n = len(self.cfg.dims)
        names = [f"E{i + 1}({j + 1})" for i in range(n) for j in range(self.cfg.depths[i])]
        return names + [f"D{n - i}({j + 1})" for i in range(n) for j in range(self.cfg.depths_decoder[i])]

    def forward(self, x: torch.Tensor, intermediates: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits; with ``intermediates`` also the block outputs (:meth:`forward_intermediates`).
        The keyword goes through ``forward`` so that a DistributedDataParallel wrapper sees the call."""
        if not intermediates:
            return self._forward(x, None)
        features: list[torch.Tensor] = []
        return self._forward(x, features), features

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every VSS block's output, (B, C, H, W) views in :meth:`block_names` order
        (timm's ``forward_intermediates``): the maps CM-SSM's distillation losses read."""
        return self.forward(x, intermediates=True)

    def _forward(self, x: torch.Tensor, features: list[torch.Tensor] | None) -> torch.Tensor:
        self.check_input(x)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = self.pos_drop(self.patch_embed(x))
        skips = []
        for layer in self.layers:
            skips.append(x)
            x = _run(layer.blocks, x, features)
            if layer.downsample is not None:
                x = layer.downsample(x)
        for i, layer in enumerate(self.layers_up):
            if i > 0:
                skip = skips[-i]
                if self.skip_attention is not None:
                    skip = self.skip_attention[i - 1](skip.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                x = x + skip
            if layer.upsample is not None:
                x = layer.upsample(x)
            x = _run(layer.blocks, x, features)
        if self.final_up.folds(self.final_conv):  # the final LayerNorm and 1x1 head as one function
            return self.final_up.forward_head(x, self.final_conv)
        return self.final_conv(self.final_up.forward_channels_first(x))


def build_vmunet(name: str, defaults: dict, kwargs: dict) -> VMUNet:
    cfg = build_config(VMUNetConfig, defaults, kwargs, name)
    model = VMUNet(cfg)
    if cfg.pretrained_file:
        from lesionkit.models.vmunet_checkpoint import load_pretrained

        load_pretrained(model, cfg.pretrained_file)
    return model


# A small vmunet_tiny for the registry smoke test: 64 px is the smallest size with 4 stages
# whose deepest map is 2x2.
_TINY_SMOKE = {"kwargs": {}, "input_size": (3, 64, 64)}
TINY_DIMS = (24, 48, 96, 192)


@register_model(smoke_test={"kwargs": {"dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1),
                                       "depths_decoder": (1, 1, 1, 1)}, "input_size": (3, 32, 32)})
def vmunet(**kwargs) -> VMUNet:
    """VM-UNet, paper size: 27,427,561 parameters at 1 class (the official code's count)."""
    return build_vmunet("vmunet", {}, kwargs)


@register_model(smoke_test=_TINY_SMOKE)
def vmunet_tiny(**kwargs) -> VMUNet:
    """VM-UNet at a quarter of the width, for 128-px input on a CPU."""
    return build_vmunet("vmunet_tiny", {"dims": TINY_DIMS}, kwargs)


__all__ = ["CMSSMSwitches", "VMUNet", "VMUNetConfig", "vmunet", "vmunet_tiny"]
