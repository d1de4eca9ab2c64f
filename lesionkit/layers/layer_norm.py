"""``torch.nn.LayerNorm`` over the last dimension, with lesionkit's kernel where it pays.

On a CPU, for bf16 / fp16 inputs (as under bf16 autocast, where the projections before a
LayerNorm return bf16), the normalisation runs through :func:`lesionkit.kernels.layer_norm_last`
(float32 statistics, the output in the input's dtype, as PyTorch's), and so it does for a
float32 / float64 input that is a channels-first view (SS2D's out_norm on the permuted scan
output), which the kernel reads in place where PyTorch's LayerNorm copies it to rows first;
everywhere else it is ``nn.LayerNorm`` itself.
Same parameters and state-dict keys as ``nn.LayerNorm``, so checkpoints load either way.
"""

from __future__ import annotations

import torch
from torch import nn

from lesionkit.kernels.layer_norm import channels_first_view, layer_norm_last
from lesionkit.layers.linear import _plain_graph

_HALF = (torch.bfloat16, torch.float16)
_FULL = (torch.float32, torch.float64)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (one normalised dimension, affine) that takes lesionkit's CPU kernel for
    bf16 / fp16 inputs, where PyTorch's kernel is slow on the SS2D models' short rows of 24-384
    channels (docs/cmssm.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Where PyTorch's LayerNorm sees a 16-bit input (on a CPU, with or without autocast,
        # which leaves layer_norm's dtype to its input) the kernel gives the same function in
        # the same dtype. A float32 / float64 input takes the kernel only when it is a
        # channels-first view (the permuted scan output of SS2D's out_norm), which PyTorch's
        # LayerNorm copies to rows first, and which the kernel reads in place - not while
        # tracing, exporting or compiling, which see PyTorch's op. Everywhere else nn.LayerNorm.
        if (x.device.type != "cpu" or self.weight is None or self.bias is None
                or len(self.normalized_shape) != 1):
            return super().forward(x)
        if x.dtype in _HALF or (x.dtype in _FULL and channels_first_view(x) and not _plain_graph()):
            return layer_norm_last(x, self.weight, self.bias, self.eps)
        return super().forward(x)


__all__ = ["LayerNorm"]
