"""Bring VM-UNet / VMamba weights into lesionkit's ``vmunet``.

Two formats are read:

- an official VM-UNet checkpoint: the state dict of its ``VMUNet`` module (keys ``vmunet.*``,
  as its ``best.pth``), or a dict holding it under ``model_state_dict`` (its ``latest.pth``).
  lesionkit's module names are VM-UNet's ``VSSM`` names, so the ``vmunet.`` prefix is dropped
  and the state dict loads strictly: every key and shape must match.
- a VMamba v0 ImageNet classification checkpoint, ``{"model": state_dict}`` (VM-UNet starts
  from ``vmamba_small_e238_ema.pth``). As VM-UNet's ``load_from``: first every key the model
  also has (patch embedding, encoder stages), then the encoder stages again mirrored into the
  decoder (stage i -> decoder stage n-1-i; blocks the decoder lacks, the patch merging and the
  classifier head are left out). Unlike ``load_from``, a shape mismatch raises instead of
  failing inside ``load_state_dict``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_STAGE = re.compile(r"^layers\.(\d+)\.")


@dataclass
class LoadReport:
    format: str  # "vmunet" or "vmamba"
    loaded: list[str] = field(default_factory=list)  # model keys that received a tensor
    missing: list[str] = field(default_factory=list)  # model keys left at their initial values
    unused: list[str] = field(default_factory=list)  # checkpoint keys that went nowhere

    def summary(self) -> str:
        return (f"{self.format} checkpoint: {len(self.loaded)} tensors loaded, {len(self.missing)} model tensors "
                f"not in it, {len(self.unused)} checkpoint tensors unused")


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def read_checkpoint(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """``(format, state_dict)`` of a VM-UNet or VMamba checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_file {str(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"pretrained_file {str(path)!r} should hold a state dict, got {type(obj).__name__}")
    if isinstance(obj.get("model"), dict):
        return "vmamba", _strip(obj["model"], "module.")
    if isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    state = _strip(obj, "module.")
    if any(k.startswith("vmunet.") for k in state):
        return "vmunet", _strip(state, "vmunet.")
    raise ValueError(f"pretrained_file {str(path)!r} is neither a VM-UNet state dict (keys 'vmunet.*') nor a VMamba "
                     f"checkpoint ({{'model': state_dict}}); its first keys are {list(state)[:5]}")


def vmamba_to_vmunet(state: dict[str, torch.Tensor], model_keys: set[str], num_stages: int
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """VM-UNet's ``load_from`` mapping: (encoder part, decoder part) of a VMamba state dict."""
    encoder = {k: v for k, v in state.items() if k in model_keys}
    decoder = {}
    for k, v in state.items():
        m = _STAGE.match(k)
        if m is None:
            continue
        new = f"layers_up.{num_stages - 1 - int(m.group(1))}." + k[m.end():]
        if new in model_keys:
            decoder[new] = v
    return encoder, decoder


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load ``path`` into a ``VMUNet`` and return (and log) what was loaded."""
    fmt, state = read_checkpoint(path)
    own = model.state_dict()
    if fmt == "vmunet":
        model.load_state_dict(state, strict=True)
        report = LoadReport(fmt, loaded=sorted(own), missing=[], unused=[])
    else:
        encoder, decoder = vmamba_to_vmunet(state, set(own), len(model.layers))
        mapped = {**encoder, **decoder}
        bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
               for k, v in mapped.items() if v.shape != own[k].shape]
        if bad:
            raise ValueError(f"pretrained_file {str(path)!r} does not fit this model's sizes (a VMamba checkpoint needs "
                             f"dims {[96, 192, 384, 768]} and d_state 16 for VMamba-T/S): {bad[:5]}")
        model.load_state_dict(mapped, strict=False)
        used = set(encoder) | {k for k in state if _STAGE.match(k) and
                               f"layers_up.{len(model.layers) - 1 - int(_STAGE.match(k).group(1))}."
                               + k[_STAGE.match(k).end():] in decoder}
        report = LoadReport(fmt, loaded=sorted(mapped), missing=sorted(set(own) - set(mapped)),
                            unused=sorted(set(state) - used))
    log.info("%s: %s", path, report.summary())
    model.pretrained_report = report
    return report


__all__ = ["LoadReport", "load_pretrained", "read_checkpoint", "vmamba_to_vmunet"]
