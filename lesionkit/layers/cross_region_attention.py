"""Cross-Region Attention (CM-SSM Sec. 3.3, Eq. 1-7) - the equations of Coordinate Attention
(Hou et al., CVPR 2021)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.layers.vss_block import gate_logit


class CrossRegionAttention(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): y_c(i, j) = x_c(i, j) * g^h_c(i) * g^w_c(j) (Eq. 7).

    z^h, z^w: means over W and over H (Eq. 2-3); f = delta(BN(F1([z^h, z^w]))) with a shared
    1x1 conv F1 to ``mip`` channels (Eq. 4); f split back into f^h, f^w and g = sigmoid(T(f))
    with one 1x1 conv per direction (Eq. 5-6). The paper gives neither the reduction nor delta:
    ours follow Coordinate Attention, mip = max(8, C // 32) and h-swish.
    """

    def __init__(self, dim: int, reduction: int = 32, min_mip: int = 8) -> None:
        super().__init__()
        mip = max(min_mip, dim // reduction)
        self.conv1 = nn.Conv2d(dim, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.conv_h = nn.Conv2d(mip, dim, 1)
        self.conv_w = nn.Conv2d(mip, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        z_h = x.mean(dim=3, keepdim=True)  # (B, C, H, 1), Eq. 2
        z_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (B, C, W, 1), Eq. 3
        f = F.hardswish(self.bn1(self.conv1(torch.cat([z_h, z_w], dim=2))))  # Eq. 4
        f_h, f_w = torch.split(f, [height, width], dim=2)
        g_h = torch.sigmoid(self.conv_h(f_h))  # (B, C, H, 1), Eq. 5
        g_w = torch.sigmoid(self.conv_w(f_w.transpose(2, 3)))  # (B, C, 1, W), Eq. 6
        return x * g_h * g_w

    @torch.no_grad()
    def init_gate(self, gate: float) -> None:
        """Start as a near-identity, y ~ ``gate`` * x (ours; the paper gives no initialisation):
        each direction's sigmoid opens at sqrt(gate) through its bias, and small T_h / T_w
        weights keep the start independent of the input. With PyTorch's default convolution
        init both gates sit near 0.5 and every skip reaches the decoder at about a quarter."""
        bias = gate_logit(math.sqrt(gate))
        for conv in (self.conv_h, self.conv_w):
            nn.init.trunc_normal_(conv.weight, std=0.02)
            nn.init.constant_(conv.bias, bias)
