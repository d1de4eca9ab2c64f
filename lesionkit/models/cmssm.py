"""CM-SSM U-Net (skin lesion segmentation, VM-UNet + inter-channel and spatial enhancement).

Every part of the paper is a switch (Tables 4-5): ``se`` (squeeze-and-excitation after SS2D),
``cmn`` (Channel Mixing Network), ``cra`` (Cross-Region Attention on the skips), ``cfd`` /
``ifd`` (feature distillation losses, lambda 0.015 each, Eq. 10). With all off it is VM-UNet.
While training with ``cfd`` or ``ifd`` on, the model returns a ``SegmentationOutput`` whose
``extras`` hold the weighted ``cfd_loss`` / ``ifd_loss``; the ``cmssm`` trainer adds them to
BCE 0.3 + Dice 0.7 (Eq. 11).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lesionkit.models.registry import build_config, register_model
from lesionkit.models.vmunet import TINY_DIMS, CMSSMSwitches, VMUNet, VMUNetConfig


@dataclass
class CMSSMConfig(VMUNetConfig, CMSSMSwitches):
    se: bool = True
    cmn: bool = True
    cra: bool = True
    cfd: bool = True
    ifd: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.se_reduction < 1 or self.cmn_ratio <= 0:
            raise ValueError(f"se_reduction should be >= 1 and cmn_ratio > 0, got {self.se_reduction}, {self.cmn_ratio}")
        if self.cfd_weight < 0 or self.ifd_weight < 0:
            raise ValueError(f"cfd_weight and ifd_weight should be >= 0, got {self.cfd_weight}, {self.ifd_weight}")


def _build(name: str, defaults: dict, kwargs: dict) -> VMUNet:
    cfg = build_config(CMSSMConfig, defaults, kwargs, name)
    switch_names = {f.name for f in dataclasses.fields(CMSSMSwitches)}
    net_names = {f.name for f in dataclasses.fields(VMUNetConfig)}
    switches = CMSSMSwitches(**{k: getattr(cfg, k) for k in switch_names})
    net = VMUNetConfig(**{k: getattr(cfg, k) for k in net_names if k != "pretrained_file"})
    if cfg.pretrained_file:
        raise ValueError(f"model {name!r}: pretrained_file is supported for vmunet only (official VM-UNet / "
                         "VMamba checkpoints); CM-SSM has no released weights")
    return VMUNet(net, switches)


@register_model(smoke_test={"kwargs": {"dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1),
                                       "depths_decoder": (1, 1, 1, 1)}, "input_size": (3, 32, 32)})
def cmssm_unet(**kwargs) -> VMUNet:
    """CM-SSM U-Net, paper size (VM-UNet's dims and depths, every module on)."""
    return _build("cmssm_unet", {}, kwargs)


@register_model(smoke_test={"kwargs": {}, "input_size": (3, 64, 64)})
def cmssm_tiny(**kwargs) -> VMUNet:
    """CM-SSM U-Net at a quarter of the width, for 128-px input on a CPU."""
    return _build("cmssm_tiny", {"dims": TINY_DIMS}, kwargs)


__all__ = ["CMSSMConfig", "cmssm_tiny", "cmssm_unet"]
