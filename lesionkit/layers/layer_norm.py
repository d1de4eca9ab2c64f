"""``torch.nn.LayerNorm`` over the last dimension, with lesionkit's kernel where it pays.

On a CPU, for bf16 / fp16 inputs (as under bf16 autocast, where the projections before a
LayerNorm return bf16), the normalisation runs through :func:`lesionkit.kernels.layer_norm_last`
(float32 statistics, the output in the input's dtype, as PyTorch's); everywhere else it is
``nn.LayerNorm`` itself.
Same parameters and state-dict keys as ``nn.LayerNorm``, so checkpoints load either way.
"""

from __future__ import annotations

import torch
from torch import nn

from lesionkit.kernels.layer_norm import layer_norm_last

_HALF = (torch.bfloat16, torch.float16)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (one normalised dimension, affine) that takes lesionkit's CPU kernel for
    bf16 / fp16 inputs, where PyTorch's kernel is slow on the SS2D models' short rows of 24-384
    channels (docs/cmssm.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Where PyTorch's LayerNorm sees a 16-bit input (on a CPU, with or without autocast,
        # which leaves layer_norm's dtype to its input) the kernel gives the same function in
        # the same dtype; everywhere else nn.LayerNorm runs.
        if (x.device.type != "cpu" or x.dtype not in _HALF or self.weight is None or self.bias is None
                or len(self.normalized_shape) != 1):
            return super().forward(x)
        return layer_norm_last(x, self.weight, self.bias, self.eps)


__all__ = ["LayerNorm"]
