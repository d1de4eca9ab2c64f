"""CM-SSM U-Net (skin lesion segmentation, VM-UNet + inter-channel and spatial enhancement).

Every module of the paper is a switch (Table 4): ``se`` (squeeze-and-excitation after SS2D),
``cmn`` (Channel Mixing Network), ``cra`` (Cross-Region Attention on the skips). With all off it
is VM-UNet, and with them on it starts as VM-UNet (``gate_init``, ``cmn_zero_init``). The
feature distillation losses (Table 5, Eq. 8-10) belong to the recipe: the ``cmssm`` trainer's
``cmssm:`` block, computed from :meth:`VMUNet.forward_intermediates`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from lesionkit.models.registry import build_config, register_model
from lesionkit.models.vmunet import TINY_DIMS, CMSSMSwitches, VMUNet, VMUNetConfig


@dataclass
class CMSSMConfig(VMUNetConfig, CMSSMSwitches):
    se: bool = True
    cmn: bool = True
    cra: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.se_reduction < 1 or self.cmn_ratio <= 0:
            raise ValueError(f"se_reduction should be >= 1 and cmn_ratio > 0, got {self.se_reduction}, {self.cmn_ratio}")
        if self.gate_init is not None and not 0.0 < self.gate_init < 1.0:
            raise ValueError(f"gate_init should be in (0, 1) or null, got {self.gate_init}")


# Model kwargs of lesionkit 0.1.0 that are recipe fields now (the ``cmssm:`` block); accepted
# so that older checkpoints and configs still build.
MOVED_TO_RECIPE = ("cfd", "ifd", "cfd_weight", "ifd_weight")


def _build(name: str, defaults: dict, kwargs: dict) -> VMUNet:
    moved = sorted(k for k in MOVED_TO_RECIPE if k in kwargs)
    if moved:
        warnings.warn(f"model {name!r}: {moved} are no longer model arguments; set them in the recipe's "
                      "'cmssm:' block (trainer: cmssm). The model ignores them.", FutureWarning, stacklevel=3)
        kwargs = {k: v for k, v in kwargs.items() if k not in MOVED_TO_RECIPE}
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


__all__ = ["MOVED_TO_RECIPE", "CMSSMConfig", "cmssm_tiny", "cmssm_unet"]
