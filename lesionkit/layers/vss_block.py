"""VSS block (VM-UNet) and its CM-SSM form: LayerNorm -> SS2D [-> SE] -> DropPath, residual;
optionally followed by the Channel Mixing Network (CM-SSM Sec. 3.2, Fig. 2)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.layers.ss2d import SS2D
from lesionkit.layers.layer_norm import LayerNorm
from lesionkit.layers.linear import Linear


def gate_logit(gate: float) -> float:
    """The sigmoid input that gives ``gate``, for gates initialised at a chosen opening."""
    if not 0.0 < gate < 1.0:
        raise ValueError(f"gate should be in (0, 1), got {gate}")
    return math.log(gate / (1.0 - gate))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability ``p`` in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability should be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcitation(nn.Module):
    """Hu et al.'s SE on channels-last (B, H, W, C): global average pool, FC -> ReLU -> FC ->
    sigmoid, reweight the channels. CM-SSM puts it after the 2D scan (Sec. 3.2)."""

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(1, 2), keepdim=True)))))
        return x * w

    @torch.no_grad()
    def init_gate(self, gate: float) -> None:
        """Start as a near-identity: every channel weight ``gate`` (ours, the paper gives no
        initialisation). The bias sets the level, small excitation weights keep the input's
        say; Adam's per-parameter steps let the gate leave the sigmoid's flat tail anyway."""
        nn.init.trunc_normal_(self.fc2.weight, std=0.02)
        nn.init.constant_(self.fc2.bias, gate_logit(gate))


class ChannelMixing(nn.Module):
    """CM-SSM's Channel Mixing Network on (B, H, W, C): FC C -> rC, depthwise 3x3 conv on the
    expanded channels, GELU, FC rC -> C. The paper names a depthwise conv and two FC layers that
    "extend and recover" the channels, the conv working "on the channel after extension"; the
    order, GELU and r = 4 are ours."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(F.gelu(x))

    @torch.no_grad()
    def zero_init_output(self) -> None:
        """The residual branch starts at exactly zero (ours; as Goyal et al.'s zero-initialised
        last BatchNorm): the block computes VM-UNet's function until fc2 learns."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)


class VSSBlock(nn.Module):
    """(B, H, W, C) -> (B, H, W, C). VM-UNet: x + DropPath(SS2D(LN(x))). CM-SSM adds SE on the
    SS2D output (``se``) and a second residual branch x + DropPath(CMN(LN(x))) (``cmn``)."""

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, d_state: int = 16, attn_drop_rate: float = 0.0,
                 se: bool = False, se_reduction: int = 16, cmn: bool = False, cmn_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(hidden_dim)
        self.self_attention = SS2D(hidden_dim, d_state=d_state, dropout=attn_drop_rate)
        self.se = SqueezeExcitation(hidden_dim, se_reduction) if se else None
        self.drop_path = DropPath(drop_path)
        if cmn:
            self.ln_2 = LayerNorm(hidden_dim)
            self.cmn = ChannelMixing(hidden_dim, cmn_ratio)
        else:
            self.ln_2 = self.cmn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.self_attention(self.ln_1(x))
        if self.se is not None:
            y = self.se(y)
        x = x + self.drop_path(y)
        if self.cmn is not None:
            x = x + self.drop_path(self.cmn(self.ln_2(x)))
        return x
