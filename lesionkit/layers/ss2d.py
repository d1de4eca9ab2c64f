"""SS2D, the 2D selective-scan mixer of VMamba / VM-UNet ("v0"), on ``lesionkit.kernels``.

Layout and parameter names follow VM-UNet's ``SS2D`` so that its checkpoints load unchanged
(``in_proj``, ``conv2d``, ``x_proj_weight``, ``dt_projs_weight``, ``dt_projs_bias``, ``A_logs``,
``Ds``, ``out_norm``, ``out_proj``). The four-direction scan itself is
:func:`lesionkit.kernels.selective_scan_2d`: the layer computes dt, B and C per pixel in
spatial layout (the projections are per pixel, so they commute with the cross-scan) and the op
reads each direction through its index map, so no (B, 4, D, H*W) copy is made here.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lesionkit.kernels import selective_scan_2d
from lesionkit.layers.layer_norm import LayerNorm
from lesionkit.layers.linear import Linear, bmm

DIRECTIONS = 4


def mark_no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Tag ``param`` so that :func:`lesionkit.engine.param_groups.parameter_groups` exempts it
    from weight decay (Mamba's ``_no_weight_decay`` attribute)."""
    param._no_weight_decay = True
    return param


def dt_bias_init(d_inner: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's dt initialisation: softplus(bias) is log-uniform in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


class SS2D(nn.Module):
    """VM-UNet's SS2D: (B, H, W, C) -> (B, H, W, C).

    in_proj -> (x, z); x: depthwise 3x3 conv, SiLU, per-direction x_proj -> (dt, B, C),
    dt_proj, four-direction selective scan (S4D-real A, D skip, softplus dt); out_norm,
    gate by SiLU(z), out_proj.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2.0,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 dropout: float = 0.0, conv_bias: bool = True, bias: bool = False) -> None:
        super().__init__()
        if d_model < 1 or d_state < 1:
            raise ValueError(f"SS2D needs d_model >= 1 and d_state >= 1, got d_model={d_model}, d_state={d_state}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        d_inner, k = self.d_inner, DIRECTIONS

        self.in_proj = Linear(d_model, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        # Stacked per-direction projections, as VM-UNet stores them (its x_proj / dt_projs lists
        # are stacked and deleted at construction).
        x_proj = torch.empty(k, self.dt_rank + 2 * d_state, d_inner)
        for w in x_proj:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's default, as there
        self.x_proj_weight = nn.Parameter(x_proj)
        std = self.dt_rank ** -0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, self.dt_rank).uniform_(-std, std))
        self.dt_projs_bias = nn.Parameter(torch.stack([dt_bias_init(d_inner, dt_min, dt_max, dt_init_floor)
                                                       for _ in range(k)]))
        # S4D-real: A[:, n] = -(n + 1), stored as log; one copy per direction, merged (4 * d_inner, N).
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k * d_inner, 1)
        self.A_logs = mark_no_weight_decay(nn.Parameter(a_log))
        self.Ds = mark_no_weight_decay(nn.Parameter(torch.ones(k * d_inner)))
        self.out_norm = LayerNorm(d_inner)
        self.out_proj = Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, D, H, W): the four scans, mapped back and summed.

        Both projections are written as matmuls whose outputs are already in the layout the
        scan reads, (B, 4, ., H*W) with the pixels last: weight (rows, D) @ x (D, H*W) per image.
        An einsum over (b, d, h, w) lowers to a bmm over (B*H*W, D) and then permutes its output
        into that layout, which cost more than the matmuls themselves on a CPU.
        """
        batch, d, height, width = x.shape
        k, n, r = DIRECTIONS, self.d_state, self.dt_rank
        length = height * width
        rows = k * (r + 2 * n)
        weight = self.x_proj_weight.to(x.dtype).reshape(1, rows, d).expand(batch, rows, d)
        x_dbl = bmm(weight, x.reshape(batch, d, length)).view(batch, k, r + 2 * n, length)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)
        dt_weight = self.dt_projs_weight.to(x.dtype).unsqueeze(0).expand(batch, k, d, r).reshape(batch * k, d, r)
        dts = bmm(dt_weight, dts.reshape(batch * k, r, length))  # (B * 4, D, L)
        A = -torch.exp(self.A_logs.float()).view(k, d, n)
        return selective_scan_2d(x, dts.view(batch, k, d, height, width), A,
                                 Bs.unflatten(-1, (height, width)), Cs.unflatten(-1, (height, width)),
                                 self.Ds.float().view(k, d), self.dt_projs_bias.float(), dt_softplus=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"SS2D expects (B, H, W, {self.d_model}) channels-last input, got {tuple(x.shape)}")
        x, z = self.in_proj(x).chunk(2, dim=-1)
        # z is a strided view (half of each row); SiLU and its gradient on such a view ran 5.7x
        # slower in bf16 than on a contiguous copy, copy included (4.2 against 0.74 ms forward +
        # backward at (8, 32, 32, 48), one thread, AMD EPYC Zen 5).
        z = z.contiguous()
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = self.forward_core(x).permute(0, 2, 3, 1)
        y = self.out_norm(y) * F.silu(z)
        return self.dropout(self.out_proj(y))
