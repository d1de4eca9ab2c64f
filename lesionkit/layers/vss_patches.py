"""VM-UNet's resolution changes, channels-last (B, H, W, C): patch embedding, 2x2 merging, 2x
expanding and the final 4x expand. Module and parameter names follow VM-UNet's so that its
checkpoints load unchanged."""

from __future__ import annotations

import torch
from torch import nn

from lesionkit.layers.layer_norm import LayerNorm
from lesionkit.layers.linear import Linear


def _pixel_unshuffle_channels_last(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, H, W, s*s*c) -> (B, s*H, s*W, c), channel index laid out as (p1, p2, c)."""
    batch, height, width, channels = x.shape
    c = channels // (scale * scale)
    x = x.view(batch, height, width, scale, scale, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height * scale, width * scale, c)


class PatchEmbed2D(nn.Module):
    """(B, C_in, H, W) -> (B, H/p, W/p, C): p x p conv with stride p, then LayerNorm."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C): the 2x2 neighbours concatenated, LayerNorm(4C), Linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)
        self.norm = LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, _ = x.shape
        if height % 2 or width % 2:
            raise ValueError(f"PatchMerging2D needs an even height and width, got {height}x{width}")
        # Swin's order: (0, 0), (1, 0), (0, 1), (1, 1) - the pretrained reduction weights expect it.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand2D(nn.Module):
    """(B, H, W, 2C) -> (B, 2H, 2W, C): Linear 2C -> 4C (no bias), 2x2 rearrange, LayerNorm(C).

    ``dim`` is the output width C, as in VM-UNet (whose decoder stage of width C holds it).
    """

    def __init__(self, dim: int, dim_scale: int = 2) -> None:
        super().__init__()
        self.dim = 2 * dim
        self.dim_scale = dim_scale
        self.expand = Linear(self.dim, dim_scale * self.dim, bias=False)
        self.norm = LayerNorm(self.dim // dim_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_pixel_unshuffle_channels_last(self.expand(x), self.dim_scale))


class FinalPatchExpand2D(nn.Module):
    """(B, H, W, C) -> (B, 4H, 4W, C/4): Linear C -> 4C (no bias), 4x4 rearrange, LayerNorm(C/4)."""

    def __init__(self, dim: int, dim_scale: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.dim_scale = dim_scale
        self.expand = Linear(dim, dim_scale * dim, bias=False)
        self.norm = LayerNorm(dim // dim_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_pixel_unshuffle_channels_last(self.expand(x), self.dim_scale))

    def forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, C/4, 4H, 4W): ``forward`` followed by a permute to channels-first,
        computed the other way round. The LayerNorm over C/4 channels (6 in ``vmunet_tiny``)
        has one row per output pixel; PyTorch's kernel is slow on such short rows (and slower
        in bfloat16), so after the rearrangement the statistics are taken over dim 1 with plain
        reductions, in float32 (then back to the input's dtype). Same values as ``forward``."""
        batch, height, width, _ = x.shape
        s, c = self.dim_scale, self.dim // self.dim_scale
        y = self.expand(x).view(batch, height, width, s, s, c).permute(0, 5, 1, 3, 2, 4)
        y = y.reshape(batch, c, height * s, width * s).float()
        mean = y.mean(1, keepdim=True)
        y = y - mean
        y = y * torch.rsqrt(y.square().mean(1, keepdim=True) + self.norm.eps)
        return (y * self.norm.weight.view(1, c, 1, 1) + self.norm.bias.view(1, c, 1, 1)).to(x.dtype)

    def folds(self, head: nn.Module) -> bool:
        """Whether ``forward_head`` can take ``head``: a plain 1x1 convolution of the C/4 channels."""
        return (type(head) is nn.Conv2d and head.kernel_size == (1, 1) and head.stride == (1, 1)
                and head.padding == (0, 0) and head.dilation == (1, 1) and head.groups == 1
                and head.in_channels == self.dim // self.dim_scale and not head._forward_hooks
                and not head._forward_pre_hooks)

    def forward_head(self, x: torch.Tensor, head: nn.Conv2d) -> torch.Tensor:
        """(B, H, W, C) -> (B, K, 4H, 4W): ``head(forward_channels_first(x))`` for a 1x1 convolution
        ``head`` from C/4 to K channels, computed without the rearranged C/4-channel map.

        Each output pixel's C/4 values are one contiguous row of the expansion's output, so the
        LayerNorm and the head are a function of those rows alone, and a linear head after a
        LayerNorm folds into it: head(LN(y)) = rstd (y - mean) @ (W * gamma)^T + (W @ beta + b).
        Only the K head outputs are rearranged (not the C/4 normalised channels), and the
        backward (:class:`_NormHead`) is written out: per row one K-wide product and one
        C/4-wide update, where autograd through the channels-first form made a dozen passes over
        the (B, C/4, 4H, 4W) map. float32 statistics and products (float64 for float64), output
        in the expansion's dtype (what the convolution returns there, also under autocast)."""
        if not self.folds(head):
            raise ValueError(f"head should be a 1x1 nn.Conv2d from {self.dim // self.dim_scale} channels "
                             f"(stride 1, no padding, one group), got {head}")
        batch, height, width, _ = x.shape
        s, c = self.dim_scale, self.dim // self.dim_scale
        rows = self.expand(x).reshape(-1, c)
        weight = head.weight.reshape(head.out_channels, c)
        bias = head.bias if head.bias is not None else weight.new_zeros(head.out_channels)
        args = (rows, self.norm.weight, self.norm.bias, weight, bias, self.norm.eps)
        if torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            out = _NormHead.apply(*args)
        else:  # export, compile and inference: the same arithmetic as plain ops
            out = _norm_head(*args)[0]
        k = head.out_channels
        out = out.view(k, batch, height, width, s, s).permute(1, 0, 2, 4, 3, 5)
        return out.reshape(batch, k, height * s, width * s)


def _norm_head(rows: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor, eps: float):
    """(R, c) rows -> (K, R) = linear(LayerNorm(rows)) transposed, and what the backward keeps.

    The rows are turned into (c, R) first: with c as small as 6, every broadcast of a per-row
    statistic over the (R, c) layout ran at a fraction of the memory speed, over (c, R) it is a
    plain row-wise operation."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    c = rows.shape[-1]
    x = torch.empty((c, rows.shape[0]), dtype=acc, device=rows.device)
    x.copy_(rows.t())
    xc = x - x.sum(0, keepdim=True) / c
    rstd = torch.rsqrt(xc.square().sum(0, keepdim=True) / c + eps)  # (1, R)
    w = weight.to(acc)
    folded = w * ln_weight.to(acc)  # (K, c): the head's weights through gamma
    shift = w @ ln_bias.to(acc) + bias.to(acc)  # (K,)
    s = (folded @ xc) * rstd  # (K, R): sum_c folded_c xhat_c
    return (s + shift[:, None]).to(rows.dtype), xc, rstd, s


class _NormHead(torch.autograd.Function):
    """linear(LayerNorm(rows)) with the LayerNorm backward written for a K-wide linear after it:
    with xhat = (x - mean) rstd and g the output gradient, dL/dxhat = g @ F (F = W * gamma), and
    the LayerNorm backward rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) needs
    mean(dxhat) = g @ mean_c(F) and sum_c dxhat xhat = sum_k g_k s_k, s the forward's products.
    Rows (R, c) in, (K, R) out."""

    @staticmethod
    def forward(ctx, rows, ln_weight, ln_bias, weight, bias, eps):
        out, xc, rstd, s = _norm_head(rows, ln_weight, ln_bias, weight, bias, eps)
        ctx.save_for_backward(xc, rstd, s, ln_weight, ln_bias, weight)
        ctx.dtypes = (rows.dtype, ln_weight.dtype, ln_bias.dtype, weight.dtype, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, rstd, s, ln_weight, ln_bias, weight = ctx.saved_tensors
        acc = xc.dtype
        g = grad_out.to(acc)  # (K, R)
        c = xc.shape[0]
        w, gamma, beta = weight.to(acc), ln_weight.to(acc), ln_bias.to(acc)
        folded = w * gamma
        centred = folded - folded.mean(-1, keepdim=True)  # (K, c)
        g_rstd = g * rstd
        coef = rstd.square() * (g * s).sum(0, keepdim=True) / c  # rstd^2 mean_c(dxhat xhat), (1, R)
        grad_rows = torch.addcmul(centred.t() @ g_rstd, xc, coef, value=-1)  # (c, R)
        g_sum = g.sum(1)  # (K,)
        g_xhat = g_rstd @ xc.t()  # (K, c): sum over rows of g_k xhat_c
        grad_weight = g_xhat * gamma + g_sum[:, None] * beta
        grad_gamma = (w * g_xhat).sum(0)
        grad_beta = (w * g_sum[:, None]).sum(0)
        d_rows, d_gamma, d_beta, d_w, d_b = ctx.dtypes
        return (grad_rows.t().to(d_rows), grad_gamma.to(d_gamma), grad_beta.to(d_beta), grad_weight.to(d_w),
                g_sum.to(d_b), None)


