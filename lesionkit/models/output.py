"""What models return: a logits tensor, or for multi-head models a :class:`SegmentationOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SegmentationOutput:
    """Segmentation logits plus the extra heads a method trains on.

    ``extras`` holds named tensors such as a reconstruction (SegMAE, AMLP), intermediate
    features for distillation (CM-SSM) or deep-supervision logits; the trainer's loss reads them
    by name. Inference uses ``logits`` only.
    """

    logits: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def segmentation_logits(output: torch.Tensor | SegmentationOutput) -> torch.Tensor:
    """The segmentation logits of any model's output."""
    if isinstance(output, SegmentationOutput):
        return output.logits
    if isinstance(output, torch.Tensor):
        return output
    raise TypeError(f"a model returned {type(output).__name__}; expected a Tensor or SegmentationOutput")
